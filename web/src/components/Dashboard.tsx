import { useCallback, useEffect, useRef, useState } from "react";
import { Api, ApiError, Preview, Sandbox, SandboxEvent, Template } from "../api";
import { navigate } from "../router";
import { isDuration } from "../time";
import { Countdown } from "./Countdown";

const LIVE = ["creating", "pooled", "running", "repairing", "lost"];

export function stateNote(s: Sandbox): string {
  switch (s.state) {
    case "expired":
      return "its time ran out; it was destroyed";
    case "destroyed":
      return "destroyed on request";
    case "failed":
      return s.error ?? "failed";
    case "repairing":
      return "a container was removed by hand; recreating it";
    case "lost":
      return s.error ?? "its node is down; it starts again there when the node is back";
    case "pooled":
      return "warm pool: ready for the next create of its template";
    default:
      return "";
  }
}

export function Dashboard({ api, onUnauthorized }: { api: Api; onUnauthorized: () => void }) {
  const [templates, setTemplates] = useState<Template[] | null>(null);
  const [sandboxes, setSandboxes] = useState<Sandbox[] | null>(null);
  const [error, setError] = useState<string | null>(null);

  const fail = useCallback(
    (err: unknown) => {
      if (err instanceof ApiError && err.status === 401) onUnauthorized();
      setError(err instanceof Error ? err.message : String(err));
    },
    [onUnauthorized],
  );
  const refresh = useCallback(() => {
    api.sandboxes().then(setSandboxes, fail);
  }, [api, fail]);

  useEffect(() => {
    api.templates().then(setTemplates, fail);
    refresh();
    const timer = window.setInterval(refresh, 3000);
    return () => window.clearInterval(timer);
  }, [api, fail, refresh]);

  return (
    <main className="dashboard">
      {error && (
        <p role="alert" className="error">
          {error}
        </p>
      )}
      <section aria-labelledby="templates-h">
        <h2 id="templates-h">Templates</h2>
        {templates === null ? (
          <p className="muted">Loading templates…</p>
        ) : templates.length === 0 ? (
          <p className="muted">No templates: add YAML files to templates/.</p>
        ) : (
          <div className="cards">
            {templates.map((t) => (
              <TemplateCard key={t.name} api={api} template={t} onCreated={refresh} />
            ))}
          </div>
        )}
      </section>
      <section aria-labelledby="sandboxes-h">
        <h2 id="sandboxes-h">Sandboxes</h2>
        {sandboxes === null ? (
          <p className="muted">Loading sandboxes…</p>
        ) : sandboxes.length === 0 ? (
          <p className="muted">No sandboxes yet: create one from a template above.</p>
        ) : (
          <SandboxTable api={api} sandboxes={sandboxes} onChange={refresh} onError={fail} />
        )}
      </section>
    </main>
  );
}

function TemplateCard({ api, template: t, onCreated }: { api: Api; template: Template; onCreated: () => void }) {
  const [ttl, setTtl] = useState(t.ttl);
  const [progress, setProgress] = useState<SandboxEvent[]>([]);
  const [creating, setCreating] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [preview, setPreview] = useState<Preview | null>(null);
  const [previewing, setPreviewing] = useState(false);
  const abort = useRef<AbortController | null>(null);
  useEffect(() => () => abort.current?.abort(), []);

  async function create() {
    setError(null);
    setProgress([]);
    try {
      const sandbox = await api.create(t.name, ttl.trim() || null);
      setCreating(sandbox.id);
      onCreated();
      abort.current = new AbortController();
      await api.events(sandbox.id, (e) => setProgress((p) => [...p, e]), abort.current.signal);
      const done = await api.sandbox(sandbox.id);
      onCreated();
      if (done.state === "failed") setError(done.error ?? "the sandbox failed");
    } catch (err) {
      if ((err as Error).name !== "AbortError") setError((err as Error).message);
    }
  }

  async function showPreview() {
    setPreviewing(true);
    setError(null);
    try {
      setPreview(await api.preview(t.name));
    } catch (err) {
      setError((err as Error).message);
    } finally {
      setPreviewing(false);
    }
  }

  const finished = progress.some((e) => e.kind === "end");
  return (
    <article className="card" aria-label={`Template ${t.name}`}>
      <h3>{t.name}</h3>
      <p>{t.description}</p>
      <dl>
        <dt>Image</dt>
        <dd>{t.base_image}</dd>
        <dt>Resources</dt>
        <dd>
          {t.cpu_limit} CPU, {t.memory_limit}, {t.pids_limit} processes
        </dd>
        <dt>Services</dt>
        <dd>{t.services.length ? t.services.join(", ") : "none"}</dd>
        <dt>TTL</dt>
        <dd>
          {t.ttl} (at most {t.max_ttl})
        </dd>
        <dt>Ports</dt>
        <dd>
          {t.expose.length
            ? t.expose.map((e) => `${e.container}${e.public ? " (public)" : ""}`).join(", ")
            : "none"}
        </dd>
      </dl>
      <div className="row">
        <label>
          TTL{" "}
          <input
            aria-label={`TTL for ${t.name}`}
            value={ttl}
            onChange={(e) => setTtl(e.target.value)}
            size={6}
            aria-invalid={!isDuration(ttl)}
          />
        </label>
        <button onClick={create} disabled={!isDuration(ttl) || (creating !== null && !finished)}>
          Create sandbox
        </button>
        <button className="secondary" onClick={showPreview} disabled={previewing}>
          {previewing ? "Previewing…" : "Preview"}
        </button>
      </div>
      {error && (
        <p role="alert" className="error">
          {error}
        </p>
      )}
      {creating && (
        <div className="progress" aria-live="polite" aria-label={`Progress of ${creating}`}>
          <p>
            Sandbox{" "}
            <a
              href={`/sandboxes/${creating}`}
              onClick={(e) => {
                e.preventDefault();
                navigate(`/sandboxes/${creating}`);
              }}
            >
              {creating}
            </a>
          </p>
          <ol>
            {progress.map((e, i) => (
              <li key={i}>
                <span className="kind">{e.kind}</span> {e.message}
              </li>
            ))}
          </ol>
        </div>
      )}
      {preview && (
        <div className="preview" aria-label={`Preview of ${t.name}`}>
          <p>
            A sandbox of {t.name} would create:{" "}
            {Object.entries(preview.summary)
              .map(([op, n]) => `${n} to ${op}`)
              .join(", ")}
          </p>
          <ul>
            {preview.changes.map((c, i) => (
              <li key={i}>
                <code>+ {c.type}</code> {c.name}
              </li>
            ))}
          </ul>
        </div>
      )}
    </article>
  );
}

export function SandboxTable({
  api,
  sandboxes,
  onChange,
  onError,
}: {
  api: Api;
  sandboxes: Sandbox[];
  onChange: () => void;
  onError: (e: unknown) => void;
}) {
  const [links, setLinks] = useState<Record<string, string>>({});

  async function act(work: Promise<unknown>) {
    try {
      await work;
      onChange();
    } catch (err) {
      onError(err);
    }
  }
  async function extend(s: Sandbox) {
    const ttl = window.prompt(`New time to live for ${s.id}, from now (e.g. 1h):`, "1h");
    if (ttl && isDuration(ttl)) await act(api.extend(s.id, ttl));
  }
  async function remove(s: Sandbox) {
    if (window.confirm(`Delete sandbox ${s.id}? Its files are destroyed with it.`)) {
      await act(api.destroy(s.id));
    }
  }
  async function link(s: Sandbox) {
    try {
      const token = await api.accessToken(s.id);
      setLinks((l) => ({ ...l, [s.id]: `${window.location.origin}${token.url}` }));
    } catch (err) {
      onError(err);
    }
  }

  return (
    <table>
      <thead>
        <tr>
          <th>Sandbox</th>
          <th>Template</th>
          <th>State</th>
          <th>Owner</th>
          <th>Expires</th>
          <th>Published</th>
          <th>Actions</th>
        </tr>
      </thead>
      <tbody>
        {sandboxes.map((s) => {
          const live = LIVE.includes(s.state);
          return (
            <tr key={s.id} data-sandbox={s.id}>
              <td>
                <a
                  href={`/sandboxes/${s.id}`}
                  onClick={(e) => {
                    e.preventDefault();
                    navigate(`/sandboxes/${s.id}`);
                  }}
                >
                  {s.id}
                </a>
              </td>
              <td>{s.template}</td>
              <td>
                <span className={`state ${s.state}`}>{s.state}</span>
                {stateNote(s) && <div className="muted small">{stateNote(s)}</div>}
              </td>
              <td>{s.owner ?? "—"}</td>
              <td>{live ? <Countdown until={s.expires_at} /> : "—"}</td>
              <td>
                {s.endpoints
                  .filter((e) => e.public && e.url)
                  .map((e) => (
                    <a key={e.port} href={e.url} target="_blank" rel="noreferrer">
                      :{e.port}
                    </a>
                  ))}
              </td>
              <td className="actions">
                {s.state === "running" && (
                  <>
                    <button className="secondary" onClick={() => extend(s)}>
                      Extend
                    </button>
                    <button className="secondary" onClick={() => link(s)}>
                      Candidate link
                    </button>
                  </>
                )}
                {(s.state === "running" || s.state === "failed") && (
                  <button className="danger" onClick={() => remove(s)}>
                    Delete
                  </button>
                )}
                {links[s.id] && (
                  <input readOnly aria-label={`Candidate link for ${s.id}`} value={links[s.id]} size={40} />
                )}
              </td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );
}
