import { useEffect, useRef, useState } from "react";
import type { Player } from "asciinema-player";
import "asciinema-player/dist/bundle/asciinema-player.css";
import { Api, Recording } from "../api";

export const SPEEDS = [1, 2, 4, 8];

// "3 min 20 s", or "in progress" while the session is open.
export function sessionLength(r: Recording): string {
  if (!r.ended_at) return "in progress";
  const seconds = Math.max(0, Math.round((Date.parse(r.ended_at) - Date.parse(r.started_at)) / 1000));
  return seconds >= 60 ? `${Math.floor(seconds / 60)} min ${seconds % 60} s` : `${seconds} s`;
}

// The sandbox's recorded terminal sessions (newest first), and a player for the chosen one;
// the list is polled every 5 s while the sandbox lives (a session's length shows as it ends).
export function Recordings({ api, id, live = false }: { api: Api; id: string; live?: boolean }) {
  const [items, setItems] = useState<Recording[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [chosen, setChosen] = useState<Recording | null>(null);
  const [asked, setAsked] = useState(0); // Refresh: read the list again

  useEffect(() => {
    let mounted = true;
    const load = () =>
      api.recordings(id).then(
        (r) => {
          if (!mounted) return;
          setItems(r);
          setError(null);
        },
        (err: Error) => mounted && setError(err.message),
      );
    load();
    const timer = live ? window.setInterval(load, 5000) : undefined;
    return () => {
      mounted = false;
      window.clearInterval(timer);
    };
  }, [api, id, asked, live]);

  return (
    <section className="recordings" aria-label="Recordings">
      <h3>
        Recordings{" "}
        <button className="link" onClick={() => setAsked(asked + 1)}>
          Refresh
        </button>
      </h3>
      {error && <p role="alert" className="error">{error}</p>}
      {items && items.length === 0 && <p className="muted">No recorded sessions yet.</p>}
      {items && items.length > 0 && (
        <ul>
          {items.map((r) => (
            <li key={r.id} data-recording={r.id}>
              <span>{new Date(r.started_at).toLocaleString()}</span>
              <span>{r.role === "candidate" ? "candidate" : `${r.client} (${r.role})`}</span>
              <span className="muted">
                {sessionLength(r)}, {r.width}×{r.height}
                {r.has_input ? ", keystrokes" : ""}
              </span>
              <button className="secondary" onClick={() => setChosen(r)} aria-label={`Replay ${r.id}`}>
                Replay
              </button>
            </li>
          ))}
        </ul>
      )}
      {chosen && <Replay api={api} recording={chosen} />}
    </section>
  );
}

// asciinema-player on one recording: its own controls seek (progress bar, arrow keys); the
// speed buttons start it again at that speed from where it was.
export function Replay({ api, recording }: { api: Api; recording: Recording }) {
  const box = useRef<HTMLDivElement>(null);
  const [speed, setSpeed] = useState(1);
  const [text, setText] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const at = useRef(0);

  useEffect(() => {
    setText(null);
    at.current = 0;
    api.recordingText(recording.download).then(setText, (err: Error) => setError(err.message));
  }, [api, recording.download]);

  useEffect(() => {
    if (text === null || !box.current) return;
    const into = box.current;
    let player: Player | null = null;
    let gone = false;
    // Loaded when first needed: the player (with its WebAssembly) is most of the UI's weight.
    void import("asciinema-player").then((AsciinemaPlayer) => {
      if (gone) return;
      player = AsciinemaPlayer.create({ data: text }, into, {
        speed,
        startAt: at.current,
        autoPlay: true,
        fit: "width",
        idleTimeLimit: 2,
      });
    });
    return () => {
      gone = true;
      if (player) {
        at.current = player.getCurrentTime();
        player.dispose();
      }
    };
  }, [text, speed]);

  return (
    <div className="replay" aria-label={`Replay of ${recording.id}`}>
      <div className="speeds" role="group" aria-label="Speed">
        {SPEEDS.map((s) => (
          <button key={s} className={s === speed ? "" : "secondary"} aria-pressed={s === speed} onClick={() => setSpeed(s)}>
            {s}×
          </button>
        ))}
        <span className="muted">seek with the bar below, or ← →</span>
      </div>
      {error && <p role="alert" className="error">{error}</p>}
      {text === null && !error && <p className="muted">Loading the recording…</p>}
      <div ref={box} className="player" data-testid="player" />
    </div>
  );
}
