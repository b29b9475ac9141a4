// A login link (…/login#code=lc_…, printed by `pipeline-console demo` and `tokens
// login-link`; or …/login#token=pc_…) travels in the fragment, which the browser never sends
// to a server or writes to its logs. The fragment leaves the address bar and the history at
// once, and nothing is sent until the person clicks: a page that sends someone here with its
// own link cannot sign them in behind their back.
(function () {
  var hash = window.location.hash;
  var match = /[#&](token|code)=([^&]+)/.exec(hash);
  if (hash) {
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  if (!match) return;
  var value;
  try {
    value = decodeURIComponent(match[2]);
  } catch (error) {
    return;
  }
  document.getElementById(match[1] === "code" ? "link-code" : "link-token").value = value;
  document.getElementById("link-says").textContent = match[1] === "code"
    ? "Sign in with the one-time login link you followed?"
    : "Sign in with the token in the link you followed?";
  document.getElementById("link-login").hidden = false;
  document.getElementById("link-sign-in").focus();
})();
