import { useEffect, useState } from "react";
import { CandidateView, candidate } from "../api";
import { ExpiryBanner } from "./ExpiryBanner";
import { RecordedNotice } from "./RecordedNotice";
import { SubmitButton } from "./SubmitButton";
import { Terminal } from "./Terminal";

// The candidate's page (/s/<token>): that one sandbox's terminal, nothing else.
export function Candidate({ token }: { token: string }) {
  const [view, setView] = useState<CandidateView | null>(null);
  const [error, setError] = useState<string | null>(null);

  useEffect(() => {
    candidate(token).then(setView, (err: Error) => setError(err.message));
  }, [token]);

  if (error) {
    return (
      <main className="candidate">
        <p role="alert" className="error page">
          {error}
        </p>
      </main>
    );
  }
  if (!view) return <p className="muted page">Opening your workspace…</p>;
  return (
    <main className="candidate">
      <ExpiryBanner until={view.expires_at} state={view.state} />
      {view.recorded && <RecordedNotice />}
      {view.endpoints.some((e) => e.public && e.url) && (
        <p className="published">
          Published:{" "}
          {view.endpoints
            .filter((e) => e.public && e.url)
            .map((e) => (
              <a key={e.port} href={e.url} target="_blank" rel="noreferrer">
                {e.url}
              </a>
            ))}
        </p>
      )}
      {view.state === "running" && <SubmitButton token={token} />}
      {view.state === "running" ? (
        <Terminal path={view.terminal} />
      ) : (
        <p className="muted page">This workspace is not available.</p>
      )}
    </main>
  );
}
