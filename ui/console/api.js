// Calls to the console API: JSON in and out, the admin token (when the server wants one) in a header, and
// SSE streams read with fetch so that the header goes with them too.

const TOKEN = 'herald-console-token';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Called when the server says the admin token is missing, invalid or expired. */
let onUnauthorized = () => {};
export function whenUnauthorized(f) { onUnauthorized = f; }

export const token = {
  get: () => sessionStorage.getItem(TOKEN),
  set: (t) => (t ? sessionStorage.setItem(TOKEN, t) : sessionStorage.removeItem(TOKEN)),
};

function headers(extra = {}) {
  const h = { ...extra };
  const t = token.get();
  if (t) h.authorization = `Bearer ${t}`;
  return h;
}

async function failure(res) {
  let body = null;
  try { body = await res.json(); } catch { /* not JSON */ }
  const err = new ApiError(res.status, body?.code ?? `http_${res.status}`, body?.message ?? res.statusText);
  if (res.status === 401 && err.code.startsWith('admin_token')) onUnauthorized(err);
  return err;
}

export async function get(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') url.searchParams.set(k, v);
  const res = await fetch(url, { headers: headers() });
  if (!res.ok) throw await failure(res);
  return res.json();
}

export async function post(path, body) {
  const res = await fetch(path, {
    method: 'POST',
    headers: headers({ 'content-type': 'application/json' }),
    body: JSON.stringify(body),
  });
  if (!res.ok) throw await failure(res);
  return res.json();
}

/**
 * Reads an SSE stream of JSON events: `onEvent(value)` for each `data:` event, `onState('open'|'retrying'|
 * 'closed', error?)` as the connection changes. Reconnects after a failure (not after a refusal such as a
 * 401 or 404). Returns `{ close() }`.
 */
export function stream(path, params, onEvent, onState = () => {}) {
  let closed = false;
  let ctrl = null;
  let retry = null;
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);

  async function run() {
    ctrl = new AbortController();
    try {
      const res = await fetch(url, { headers: headers({ accept: 'text/event-stream' }), signal: ctrl.signal });
      if (!res.ok) {
        const err = await failure(res);
        closed = true;
        onState('closed', err);
        return;
      }
      onState('open');
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
          if (data) {
            try { onEvent(JSON.parse(data)); } catch (e) { console.warn('bad event', e); }
          }
        }
      }
    } catch (e) {
      if (closed) return;
    }
    if (!closed) {
      onState('retrying');
      retry = setTimeout(run, 2000);
    }
  }
  run();
  return {
    close() {
      closed = true;
      clearTimeout(retry);
      ctrl?.abort();
    },
  };
}
