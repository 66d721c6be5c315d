import { useEffect, useRef, useState } from "react";
import { FitAddon } from "@xterm/addon-fit";
import { WebLinksAddon } from "@xterm/addon-web-links";
import { Terminal as XTerm } from "@xterm/xterm";

// Close codes the server ends a terminal with; these are final, anything else reconnects.
const FINAL: Record<number, string> = {
  4401: "not allowed: the key or link is not valid",
  4403: "not allowed: a candidate's link cannot watch",
  4404: "no such sandbox",
  4409: "the sandbox is not running",
};

export function backoff(attempt: number): number {
  return Math.min(10_000, 500 * 2 ** attempt);
}

// What the status line says when the connection closes and another is tried in `wait` ms;
// the server's reason is shown when it gave one (e.g. a recording that cannot be written).
export function retryStatus(reason: string, wait: number): string {
  const why = reason ? ` (${reason})` : "";
  return `disconnected${why}; reconnecting in ${Math.round(wait / 1000)} s…`;
}

// A terminal on the sandbox's shell (tmux session "main"): fills its box, follows resizes,
// reconnects to the same shell after a network drop, Ctrl+Shift+C copies the selection.
// readOnly: nothing typed is sent (a watcher; the server drops a watcher's input anyway).
export function Terminal({ path, readOnly = false }: { path: string; readOnly?: boolean }) {
  const box = useRef<HTMLDivElement>(null);
  const [status, setStatus] = useState("connecting…");

  useEffect(() => {
    const term = new XTerm({
      cursorBlink: !readOnly,
      disableStdin: readOnly,
      fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
      fontSize: 14,
      theme: window.matchMedia("(prefers-color-scheme: light)").matches
        ? { background: "#ffffff", foreground: "#1f2328", cursor: "#1f2328", selectionBackground: "#b6d7ff" }
        : undefined,
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.loadAddon(new WebLinksAddon());
    term.open(box.current!);
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.shiftKey && e.code === "KeyC" && term.hasSelection()) {
        void navigator.clipboard?.writeText(term.getSelection());
        return false;
      }
      return true;
    });
    const encoder = new TextEncoder();
    let ws: WebSocket | null = null;
    let attempt = 0;
    let stopped = false;
    let retry: number | undefined;

    const sendSize = () => {
      if (ws?.readyState === WebSocket.OPEN) {
        ws.send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
      }
    };
    const refit = () => {
      try {
        fit.fit();
      } catch {
        // not laid out yet
      }
      sendSize();
    };
    const connect = () => {
      const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
      ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        attempt = 0;
        setStatus("connected");
        refit();
        if (!readOnly) term.focus();
      };
      ws.onmessage = (m) => {
        term.write(typeof m.data === "string" ? m.data : new Uint8Array(m.data as ArrayBuffer));
      };
      ws.onclose = (e) => {
        if (stopped) return;
        if (FINAL[e.code]) {
          setStatus(`closed: ${FINAL[e.code]}`);
          return;
        }
        const wait = backoff(attempt++);
        setStatus(retryStatus(e.reason, wait));
        retry = window.setTimeout(connect, wait);
      };
    };
    const input = term.onData((data) => {
      if (!readOnly && ws?.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
    });
    const observer = new ResizeObserver(() => refit());
    observer.observe(box.current!);
    window.addEventListener("resize", refit);
    connect();
    return () => {
      stopped = true;
      window.clearTimeout(retry);
      observer.disconnect();
      window.removeEventListener("resize", refit);
      input.dispose();
      ws?.close();
      term.dispose();
    };
  }, [path, readOnly]);

  return (
    <div className="terminal-wrap">
      <div className="terminal-status" role="status">
        {status}
      </div>
      <div className="terminal" ref={box} data-testid="terminal" />
    </div>
  );
}
