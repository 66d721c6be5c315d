import { useEffect, useState } from "react";
import { Api, Sandbox } from "../api";
import { AiTranscript } from "./AiTranscript";
import { Archives } from "./Archives";
import { ExpiryBanner } from "./ExpiryBanner";
import { Terminal } from "./Terminal";
import { Timeline } from "./Timeline";
import { Recordings } from "./Recordings";
import { WatchLive } from "./WatchLive";

export function SandboxPage({ api, id }: { api: Api; id: string }) {
  const [sandbox, setSandbox] = useState<Sandbox | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let live = true;
    const load = () =>
      api.sandbox(id).then(
        (s) => live && setSandbox(s),
        (err: Error) => live && setError(err.message),
      );
    load();
    const timer = window.setInterval(load, 5000);
    return () => {
      live = false;
      window.clearInterval(timer);
    };
  }, [api, id]);

  if (error) return <p role="alert" className="error page">{error}</p>;
  if (!sandbox) return <p className="muted page">Loading sandbox {id}…</p>;
  return (
    <main className="sandbox-page">
      <div className="sandbox-head">
        <h2>
          {sandbox.id} <span className={`state ${sandbox.state}`}>{sandbox.state}</span>
        </h2>
        <span className="muted">{sandbox.template}</span>
        {sandbox.endpoints
          .filter((e) => e.public && e.url)
          .map((e) => (
            <a key={e.port} href={e.url} target="_blank" rel="noreferrer">
              {e.url}
            </a>
          ))}
      </div>
      <ExpiryBanner until={sandbox.expires_at} state={sandbox.state} />
      {sandbox.state === "creating" && <p className="muted">The sandbox is starting…</p>}
      {sandbox.state === "running" && <Terminal path={`/api/v1/ws/terminal/${id}?token=${encodeURIComponent(api.key)}`} />}
      {sandbox.state === "failed" && <p className="error">{sandbox.error}</p>}
      <Timeline api={api} id={id} live={!["destroyed", "expired", "failed"].includes(sandbox.state)} />
      <Archives api={api} id={id} live={!["destroyed", "expired"].includes(sandbox.state)} />
      {sandbox.state === "running" && <WatchLive api={api} id={id} />}
      <Recordings api={api} id={id} live={!["destroyed", "expired", "failed"].includes(sandbox.state)} />
      <AiTranscript api={api} id={id} live={!["destroyed", "expired", "failed"].includes(sandbox.state)} />
    </main>
  );
}
