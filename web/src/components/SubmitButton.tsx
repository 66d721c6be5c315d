import { useState } from "react";
import { SubmitReport, submitCandidate } from "../api";
import { formatBytes } from "./Archives";

// The candidate's "Submit": asks first, then shows what was archived (a second submit only
// shows the first report again).
export function SubmitButton({ token }: { token: string }) {
  const [busy, setBusy] = useState(false);
  const [report, setReport] = useState<SubmitReport | null>(null);
  const [error, setError] = useState<string | null>(null);

  const submit = async () => {
    if (!window.confirm("Submit your work now? Your workspace is archived for review.")) return;
    setBusy(true);
    setError(null);
    try {
      setReport(await submitCandidate(token));
    } catch (err) {
      setError((err as Error).message);
    } finally {
      setBusy(false);
    }
  };

  if (report) {
    const a = report.archive;
    return (
      <p role="status" className="submitted">
        {a.error
          ? `Submitted, but the archive failed: ${a.error}`
          : `Submitted: ${a.files} files archived (${formatBytes(a.bytes)}).`}
        {report.destroyed && " The workspace is being removed."}
      </p>
    );
  }
  return (
    <div className="submit">
      <button type="button" onClick={submit} disabled={busy}>
        {busy ? "Submitting…" : "Submit"}
      </button>
      {error && (
        <span role="alert" className="error">
          {error}
        </span>
      )}
    </div>
  );
}
