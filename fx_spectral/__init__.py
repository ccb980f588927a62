"""fx_spectral: control the spectral norm of PyTorch weights.

Three ways over one math core and one state layout (raw parameter keeps its name; float32
buffers ``{name}_u`` / ``{name}_v`` on the owning module):

- eager: :func:`spectral_norm`, :func:`apply_spectral_norm`, :func:`remove_spectral_norm`;
- graph: :func:`transform` (torch.fx), :func:`bake`, and the torch.compile backend ``"spectral"``
  (:func:`backend` makes a configured one);
- constraints: :func:`constrain` projects weights after every optimizer step
  (:mod:`fx_spectral.constraints` holds the math), :func:`lipschitz_bound` certifies the result;
- certificates: :func:`operator_norm` brackets a convolution's true operator norm, :func:`certify`
  reads a Lipschitz bound off any traceable model.
"""

from fx_spectral import constraints
from fx_spectral.certify import Certificate, certify  # NB: binds the function over the submodule of the same name
from fx_spectral.constrain import constrain  # NB: binds the function over the submodule of the same name
from fx_spectral.graph.backend import backend  # importing the module registers backend="spectral"
from fx_spectral.graph.bake import bake
from fx_spectral.graph.transform import transform
from fx_spectral.lipschitz import lipschitz_bound
from fx_spectral.nn import (
    apply_spectral_norm,
    is_spectral_normalized,
    remove_spectral_norm,
    spectral_norm,
    spectral_sigma,
)
from fx_spectral.operator_norm import OperatorNorm, operator_norm  # NB: the function shadows the submodule

__version__ = "0.1.0"

__all__ = [
    "Certificate",
    "OperatorNorm",
    "apply_spectral_norm",
    "backend",
    "bake",
    "certify",
    "constrain",
    "constraints",
    "is_spectral_normalized",
    "lipschitz_bound",
    "operator_norm",
    "remove_spectral_norm",
    "spectral_norm",
    "spectral_sigma",
    "transform",
]
