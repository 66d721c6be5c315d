// Time left, as people read it: "4h 05m", "12m 30s", "45s", "expired".
export function formatLeft(ms: number): string {
  if (ms <= 0) return "expired";
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

// How urgent an expiry is: the banner turns to a warning in the last five minutes.
export function urgency(ms: number): "ok" | "soon" | "expired" {
  if (ms <= 0) return "expired";
  return ms <= 5 * 60 * 1000 ? "soon" : "ok";
}

// "2h", "30m", "90s" or "1h30m": the durations the API accepts for a TTL.
export function isDuration(text: string): boolean {
  return /^(\d+h)?(\d+m)?(\d+s)?$/.test(text.trim()) && /\d/.test(text);
}
