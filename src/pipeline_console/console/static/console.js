// The console's only script besides htmx (the Content-Security-Policy allows no inline
// script): a "Back" link that goes back in the history, or to its href without one.
document.addEventListener("click", function (event) {
  var link = event.target.closest && event.target.closest("a[data-back]");
  if (link && window.history.length > 1) {
    event.preventDefault();
    window.history.back();
  }
});

// The system form: show only the fields of the auth type chosen (without the script they
// are all shown, and the server ignores the others).
function showChosenAuth(form) {
  var chosen = form.querySelector("select[name=auth_type]");
  if (!chosen) return;
  form.querySelectorAll("fieldset[data-auth]").forEach(function (group) {
    group.hidden = group.getAttribute("data-auth") !== chosen.value;
  });
}
document.addEventListener("DOMContentLoaded", function () {
  var form = document.getElementById("system-form");
  if (!form) return;
  showChosenAuth(form);
  form.addEventListener("change", function (event) {
    if (event.target.name === "auth_type") showChosenAuth(form);
  });
});
