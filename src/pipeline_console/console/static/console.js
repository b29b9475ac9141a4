// The console's only script besides htmx (the Content-Security-Policy allows no inline
// script): a "Back" link that goes back in the history, or to its href without one.
document.addEventListener("click", function (event) {
  var link = event.target.closest && event.target.closest("a[data-back]");
  if (link && window.history.length > 1) {
    event.preventDefault();
    window.history.back();
  }
});
