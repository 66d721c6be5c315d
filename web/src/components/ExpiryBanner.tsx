import { Countdown } from "./Countdown";

export function ExpiryBanner({ until, state }: { until: string; state: string }) {
  if (state !== "running" && state !== "repairing") {
    return (
      <div className="banner expired" role="status">
        This sandbox is {state}
        {state === "expired" ? ": its time ran out and it was destroyed." : "."}
      </div>
    );
  }
  return (
    <div className="banner" role="status">
      Expires in <Countdown until={until} /> — save your work before then.
    </div>
  );
}
