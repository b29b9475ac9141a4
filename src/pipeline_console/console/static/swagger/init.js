// Swagger UI for /docs, from the package's own files (the page has no inline script, so the
// Content-Security-Policy holds). No validator: it would call a server on the internet.
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
