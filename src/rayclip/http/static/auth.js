// The API key, when the server has one: asked for once, kept in localStorage, sent as a Bearer token.
// Images load through <img src>, which cannot send a header, so the key also rides in a
// same-site cookie that the server accepts for /api/images/ only.
const KEY_STORE = "rayclip-api-key";

function useKey(key) {
  localStorage.setItem(KEY_STORE, key);
  document.cookie = `rayclip_api_key=${encodeURIComponent(key)}; path=/api/images; SameSite=Strict`;
}

async function authedFetch(url, options = {}) {
  const send = () => {
    const key = localStorage.getItem(KEY_STORE);
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    return fetch(url, { ...options, headers });
  };
  let response = await send();
  if (response.status === 401) {
    const key = window.prompt("This rayclip server needs its API key:");
    if (key) {
      useKey(key.trim());
      response = await send();
    }
  }
  return response;
}

if (localStorage.getItem(KEY_STORE)) useKey(localStorage.getItem(KEY_STORE));
