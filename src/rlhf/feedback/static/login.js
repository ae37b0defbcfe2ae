"use strict";
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  try {
    await api("POST", "/api/session", { token: document.getElementById("token").value.trim() });
    window.location.assign("/");
  } catch (e) {
    error.textContent = e.message;
  }
});
