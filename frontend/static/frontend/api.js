// The JSON API from the browser: session cookie + CSRF header, errors as readable text.

export function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

async function call(method, url, body) {
  const headers = { "X-CSRFToken": csrfToken(), Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin" };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    return { ok: false, status: 0, data: { error: `the site cannot be reached (${err.message})` } };
  }
  let data = {};
  try {
    data = await response.json();
  } catch (err) {
    data = { error: `the server answered ${response.status} ${response.statusText}` };
  }
  return { ok: response.ok, status: response.status, data };
}

export const submitJob = (body) => call("POST", "/api/jobs", body);
export const cancelJob = (job) => call("DELETE", job.status_url);
export const listJobs = (url = "/api/jobs") => call("GET", url);
export const listModels = () => call("GET", "/api/models");

export function errorText(result) {
  const data = result.data || {};
  return data.error || `request failed (${result.status})`;
}
