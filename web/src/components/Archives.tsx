import { useEffect, useState } from "react";
import { Api, Archive } from "../api";

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${Math.round(n / 1024)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// The sandbox's workspace archives (made before a destroy and on submit; they outlive the
// sandbox): each with its download and its git summary. Polled while the sandbox lives.
export function Archives({ api, id, live }: { api: Api; id: string; live: boolean }) {
  const [items, setItems] = useState<Archive[] | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    let mounted = true;
    const load = () =>
      api.archives(id).then(
        (a) => mounted && setItems(a),
        (err: Error) => mounted && setError(err.message),
      );
    load();
    const timer = live ? window.setInterval(load, 5000) : undefined;
    return () => {
      mounted = false;
      window.clearInterval(timer);
    };
  }, [api, id, live]);

  const download = async (a: Archive) => {
    if (!a.download) return;
    try {
      const url = URL.createObjectURL(await api.archiveBlob(a.download));
      const link = document.createElement("a");
      link.href = url;
      link.download = `sandbox-${a.sandbox_id}-${a.reason}-${a.id}.tar.gz`;
      link.click();
      URL.revokeObjectURL(url);
    } catch (err) {
      setError((err as Error).message);
    }
  };

  if (error) return <p role="alert" className="error">{error}</p>;
  if (!items || items.length === 0) return null;
  return (
    <section className="archives" aria-label="Archives">
      <h3>Archives</h3>
      <ul>
        {items.map((a) => (
          <li key={a.id}>
            <time dateTime={a.created_at}>{new Date(a.created_at).toLocaleString()}</time>{" "}
            <span className="reason">{a.reason}</span>{" "}
            {a.error ? (
              <span className="error">failed: {a.error}</span>
            ) : (
              <>
                {a.files} files, {formatBytes(a.bytes)}{" "}
                <button type="button" onClick={() => download(a)}>
                  Download
                </button>
              </>
            )}
            {a.notes && <p className="muted">{a.notes}</p>}
            {a.git && (
              <details>
                <summary>Git log and diff</summary>
                <pre className="git">{a.git}</pre>
              </details>
            )}
          </li>
        ))}
      </ul>
    </section>
  );
}
