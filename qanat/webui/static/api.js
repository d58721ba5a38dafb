// The page's only door to the server: the key (this tab only), JSON calls, and chat completions as SSE.

const KEY = "qanat.apiKey";

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = {
  get: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

function headers(extra = {}) {
  const key = apiKey.get();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code;
    }
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) {
    apiKey.clear();
    return new AuthError(message);
  }
  return new ApiError(message, response.status, code);
}

export async function getJSON(path, { auth = true } = {}) {
  const response = await fetch(path, { headers: auth ? headers() : {}, cache: "no-store" });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST a streamed chat completion and call onChunk(parsed event) for each `data:` event until [DONE].
// Aborting `signal` ends the request; the server sees the connection close and frees the slot.
export async function streamChat(body, signal, onChunk) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const parsed = JSON.parse(data);
          // An error after the first token arrives as an event (the status line was already 200).
          if (parsed.error) throw new ApiError(parsed.error.message, 200, parsed.error.code);
          onChunk(parsed);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // no-op once the stream ended; closes it after an error event
  }
}
