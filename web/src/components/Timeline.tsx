import { useEffect, useState } from "react";
import { Api, TimelineEntry } from "../api";

// What happened to the sandbox, for the reviewer (GET /api/v1/sandboxes/{id}/timeline):
// polled every 5 s while the sandbox lives, read once after it is gone.
export function Timeline({ api, id, live }: { api: Api; id: string; live: boolean }) {
  const [entries, setEntries] = useState<TimelineEntry[] | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let mounted = true;
    const load = () =>
      api.timeline(id).then(
        (e) => mounted && setEntries(e),
        (err: Error) => mounted && setError(err.message),
      );
    load();
    const timer = live ? window.setInterval(load, 5000) : undefined;
    return () => {
      mounted = false;
      window.clearInterval(timer);
    };
  }, [api, id, live]);

  if (error) return <p role="alert" className="error">{error}</p>;
  if (!entries) return null;
  return (
    <section className="timeline" aria-label="Activity timeline">
      <h3>Activity</h3>
      <ol>
        {entries.map((e, i) => (
          <li key={i} className={`timeline-${e.what}`}>
            <time dateTime={e.at}>{new Date(e.at).toLocaleTimeString()}</time>
            <span className="what">{e.what}</span>
            <span className="detail">{e.detail}</span>
          </li>
        ))}
      </ol>
    </section>
  );
}
