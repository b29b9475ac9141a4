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
  var field = match[1] === "code" ? "code" : "token";
  document.getElementById("link-" + field).value = value;
  var says = document.getElementById("link-says");
  var button = document.getElementById("link-sign-in");
  document.getElementById("link-login").hidden = false;
  button.focus();
  // Whom the link signs in as, asked without spending it: "Sign in as NAME (ROLE)?"
  var body = new URLSearchParams();
  body.set(field, value);
  fetch("/login/who", {method: "POST", body: body, credentials: "same-origin"})
    .then(function (answer) { return answer.ok ? answer.json() : null; })
    .then(function (who) {
      if (who) {
        says.textContent = "Sign in as " + who.name + " (" + who.role + ")?";
      } else {
        says.textContent = "This link is unknown, used or expired.";
        button.hidden = true;
      }
    })
    .catch(function () {});
})();
