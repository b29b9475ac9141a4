// A login link (…/login#token=pc_…, printed by `make demo`) signs in with one click; the token
// travels in the fragment, which the browser never sends to a server or writes to its logs.
(function () {
  var match = /[#&]token=([^&]+)/.exec(window.location.hash);
  if (!match) return;
  history.replaceState(null, "", window.location.pathname + window.location.search);
  document.getElementById("token").value = decodeURIComponent(match[1]);
  document.getElementById("login").submit();
})();
