import { useEffect, useState } from "react";
import { formatLeft, urgency } from "../time";

// Time left until `until`, ticking every second.
export function Countdown({ until, prefix = "" }: { until: string; prefix?: string }) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(timer);
  }, []);
  const left = new Date(until).getTime() - now;
  return (
    <span className={`countdown ${urgency(left)}`} title={new Date(until).toLocaleString()}>
      {left > 0 ? `${prefix}${formatLeft(left)}` : "expired"}
    </span>
  );
}
