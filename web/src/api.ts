// The engine's HTTP API, as the UI uses it. Errors are problem+json: `detail` is shown as is.

export type Endpoint = { port: number; public: boolean; url: string };
export type Sandbox = {
  id: string;
  template: string;
  state: string;
  reason: string | null;
  owner: string | null;
  created_at: string;
  expires_at: string;
  destroyed_at: string | null;
  endpoints: Endpoint[];
  workspace: string | null;
  error: string | null;
  links: Record<string, string>;
};
export type Template = {
  name: string;
  description: string;
  base_image: string;
  services: string[];
  cpu_limit: number;
  memory_limit: string;
  pids_limit: number;
  ttl: string;
  max_ttl: string;
  expose: { container: number; public: boolean }[];
};
export type Preview = {
  template: string;
  changes: { op: string; type: string; name: string; properties: string[] }[];
  summary: Record<string, number>;
};
export type CandidateView = {
  id: string;
  template: string;
  state: string;
  expires_at: string;
  endpoints: Endpoint[];
  terminal: string;
  recorded: boolean;
};
export type SandboxEvent = { id: number; kind: string; message: string; at: string };
export type TimelineEntry = { at: string; what: string; detail: string };
export type Archive = {
  id: number;
  sandbox_id: string;
  reason: "expired" | "deleted" | "submitted";
  created_at: string;
  expires_at: string;
  bytes: number;
  files: number;
  sha256: string | null;
  git: string | null;
  notes: string | null;
  error: string | null;
  download: string | null;
};
export type SubmitReport = { archive: Archive; destroyed: boolean };
export type Recording = {
  id: string;
  role: "candidate" | "member" | "admin";
  client: string;
  started_at: string;
  ended_at: string | null;
  width: number;
  height: number;
  bytes: number;
  has_input: boolean;
  download: string;
};

export type AiSession = {
  session_id: string | null;
  started_at: string;
  last_at: string;
  exchanges: number;
  refused: number;
  billed: number;
  agents: string[];
};
export type AiUsage = {
  sandbox_id: string;
  template: string;
  model: string | null;
  max_tokens: number;
  budget_tokens: number;
  used_tokens: number;
  input_tokens: number;
  output_tokens: number;
  cache_creation_tokens: number;
  cache_read_tokens: number;
  requests: number;
  refused: number;
  sessions: AiSession[];
};
// A content block of a message or an answer (text, thinking, tool_use, tool_result, …).
export type AiBlock = {
  type: string;
  text?: string;
  thinking?: string;
  name?: string;
  input?: unknown;
  content?: unknown;
  is_error?: boolean;
};
export type AiMessage = { role: string; content: string | AiBlock[] };
export type AiExchange = {
  id: number;
  at: string;
  finished_at: string | null;
  session_id: string | null;
  agent_id: string | null;
  side: boolean;
  model: string | null;
  status: number | null;
  refused: string | null;
  usage: Record<string, number>;
  first_message: number;
  messages: AiMessage[];
  answer: { content?: AiBlock[]; stop_reason?: string | null } | null;
  error: string | null;
};

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

// The problem's detail (and the field it names), or the status line.
export async function problemOf(response: Response): Promise<ApiError> {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") message = body.detail;
    else if (body && typeof body.title === "string") message = body.title;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

export class Api {
  constructor(readonly key: string) {}

  private async call<T>(path: string, init: RequestInit = {}): Promise<T> {
    const response = await fetch(path, {
      ...init,
      headers: { "X-API-Key": this.key, "Content-Type": "application/json", ...init.headers },
    });
    if (!response.ok) throw await problemOf(response);
    return (response.status === 204 ? undefined : await response.json()) as T;
  }

  templates = () => this.call<Template[]>("/api/v1/templates");
  preview = (name: string) =>
    this.call<Preview>(`/api/v1/templates/${encodeURIComponent(name)}/preview`, { method: "POST" });
  sandboxes = () => this.call<{ items: Sandbox[] }>("/api/v1/sandboxes").then((b) => b.items);
  sandbox = (id: string) => this.call<Sandbox>(`/api/v1/sandboxes/${id}`);
  create = (template: string, ttl: string | null) =>
    this.call<Sandbox>("/api/v1/sandboxes", {
      method: "POST",
      body: JSON.stringify(ttl ? { template, ttl } : { template }),
    });
  extend = (id: string, ttl: string) =>
    this.call<Sandbox>(`/api/v1/sandboxes/${id}/extend`, {
      method: "POST",
      body: JSON.stringify({ ttl }),
    });
  destroy = (id: string) => this.call<Sandbox>(`/api/v1/sandboxes/${id}`, { method: "DELETE" });
  timeline = (id: string) => this.call<TimelineEntry[]>(`/api/v1/sandboxes/${id}/timeline`);
  archives = (id: string) =>
    this.call<{ items: Archive[] }>(`/api/v1/sandboxes/${id}/archives`).then((b) => b.items);
  // An archive's .tar.gz (the download needs the key, so a plain link cannot fetch it).
  archiveBlob = async (download: string) => {
    const response = await fetch(download, { headers: { "X-API-Key": this.key } });
    if (!response.ok) throw await problemOf(response);
    return response.blob();
  };
  aiUsage = (id: string) => this.call<AiUsage>(`/api/v1/sandboxes/${id}/ai`);
  aiTranscript = (id: string) =>
    this.call<{ items: AiExchange[] }>(`/api/v1/sandboxes/${id}/ai/transcript`).then((b) => b.items);
  recordings = (id: string) =>
    this.call<{ items: Recording[] }>(`/api/v1/sandboxes/${id}/recordings`).then((b) => b.items);
  // A recording's asciicast text (the player parses it).
  recordingText = async (download: string) => {
    const response = await fetch(download, { headers: { "X-API-Key": this.key } });
    if (!response.ok) throw await problemOf(response);
    return response.text();
  };
  accessToken = (id: string) =>
    this.call<{ token: string; url: string; expires_at: string }>(
      `/api/v1/sandboxes/${id}/access-tokens`,
      { method: "POST" },
    );

  // The sandbox's events (server-sent), until the stream ends or `signal` aborts.
  async events(id: string, onEvent: (e: SandboxEvent) => void, signal: AbortSignal) {
    const response = await fetch(`/api/v1/sandboxes/${id}/events`, {
      headers: { "X-API-Key": this.key, Accept: "text/event-stream" },
      signal,
    });
    if (!response.ok || !response.body) throw await problemOf(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut: number;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const parsed = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (parsed) onEvent(parsed);
      }
    }
  }
}

// One server-sent event block ("event: kind\ndata: {...}") into an event, or null.
export function parseEvent(block: string): SandboxEvent | null {
  let kind = "message";
  let data = "";
  let id = 0;
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
    else if (line.startsWith("id: ")) id = Number(line.slice(4)) || 0;
  }
  if (!data) return null;
  let message = data;
  let at = "";
  try {
    const body = JSON.parse(data);
    if (body && typeof body === "object") {
      message = body.message ?? (body.state ? `state ${body.state}` : data);
      at = body.at ?? "";
    }
  } catch {
    // plain text data
  }
  return { id, kind, message, at };
}

export async function candidate(token: string): Promise<CandidateView> {
  const response = await fetch(`/api/v1/access/${encodeURIComponent(token)}`);
  if (!response.ok) throw await problemOf(response);
  return response.json();
}

// The candidate hands the work in (once: a second call answers the first report).
export async function submitCandidate(token: string): Promise<SubmitReport> {
  const response = await fetch(`/api/v1/access/${encodeURIComponent(token)}/submit`, {
    method: "POST",
  });
  if (!response.ok) throw await problemOf(response);
  return response.json();
}
