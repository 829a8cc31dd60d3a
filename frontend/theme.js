// Loaded before the page paints: the stored theme choice ("light", "dark" or none = follow the system).
(function () {
  try {
    var theme = localStorage.getItem("bastion-theme");
    if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  } catch (e) { /* storage disabled: follow the system */ }
})();
