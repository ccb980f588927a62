// Render the math that pymdownx.arithmatex (generic mode) wraps in .arithmatex elements as
// \( ... \) (inline) and \[ ... \] (display), on every page load (mkdocs-material's document$,
// which also fires on instant navigation).
document$.subscribe(({ body }) => {
  for (const el of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  }
});
