import { useEffect, useState } from "react";
import { AiBlock, AiExchange, AiMessage, AiUsage, Api, ApiError } from "../api";

// Text of a tool's result, whatever shape it came in (a string, or text blocks).
export function resultText(content: unknown): string {
  if (typeof content === "string") return content;
  if (Array.isArray(content))
    return content
      .map((c) => (c && typeof c === "object" && "text" in c ? String((c as { text: unknown }).text) : ""))
      .join("\n");
  return content == null ? "" : JSON.stringify(content);
}

// Claude Code's own reminders in a user message: not the candidate's words.
export function isReminder(block: AiBlock): boolean {
  return block.type === "text" && (block.text ?? "").trimStart().startsWith("<system-reminder>");
}

function blocksOf(message: AiMessage): AiBlock[] {
  return typeof message.content === "string" ? [{ type: "text", text: message.content }] : message.content;
}

export function percent(used: number, budget: number): number {
  return budget > 0 ? Math.min(100, Math.round((used / budget) * 100)) : 0;
}

function Block({ block, who }: { block: AiBlock; who: "candidate" | "claude" }) {
  if (block.type === "text")
    return <p className={`ai-text by-${who}`} data-kind={who === "candidate" ? "prompt" : "answer"}>{block.text}</p>;
  if (block.type === "thinking")
    return (
      <details className="ai-thinking" data-kind="thinking">
        <summary>thinking</summary>
        <p>{block.thinking}</p>
      </details>
    );
  if (block.type === "tool_use")
    return (
      <div className="ai-tool" data-kind="tool_use">
        <span className="tool-name">{block.name}</span>
        <pre>{JSON.stringify(block.input, null, 2)}</pre>
      </div>
    );
  if (block.type === "tool_result")
    return (
      <div className={`ai-result${block.is_error ? " error" : ""}`} data-kind="tool_result">
        <span className="muted">result</span>
        <pre>{resultText(block.content)}</pre>
      </div>
    );
  return <p className="muted">[{block.type}]</p>;
}

// The candidate's Claude usage against the template's budget, and the whole conversation in
// order: their prompts, Claude's answers and thinking, each tool call with its result.
// Polled every 5 s while the sandbox lives; side calls (titles, summaries) are hidden.
export function AiTranscript({ api, id, live }: { api: Api; id: string; live: boolean }) {
  const [usage, setUsage] = useState<AiUsage | null>(null);
  const [items, setItems] = useState<AiExchange[] | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [none, setNone] = useState(false);

  useEffect(() => {
    let mounted = true;
    const load = () =>
      Promise.all([api.aiUsage(id), api.aiTranscript(id)]).then(
        ([u, t]) => {
          if (!mounted) return;
          setUsage(u);
          setItems(t);
          setError(null);
        },
        (err: Error) => {
          if (!mounted) return;
          if (err instanceof ApiError && err.status === 404) setNone(true);
          else setError(err.message);
        },
      );
    load();
    const timer = live ? window.setInterval(load, 5000) : undefined;
    return () => {
      mounted = false;
      window.clearInterval(timer);
    };
  }, [api, id, live]);

  const shown = (items ?? []).filter((x) => !x.side);
  return (
    <section className="ai" aria-label="AI transcript">
      <h3>Claude</h3>
      {error && <p role="alert" className="error">{error}</p>}
      {none && <p className="muted">This sandbox has no AI gateway access.</p>}
      {usage && (
        <div className="ai-usage">
          <meter min={0} max={usage.budget_tokens} value={usage.used_tokens} aria-label="AI budget used" />
          <span data-usage>
            {usage.used_tokens.toLocaleString("en-US")} of {usage.budget_tokens.toLocaleString("en-US")} tokens (
            {percent(usage.used_tokens, usage.budget_tokens)}%)
          </span>
          <span className="muted">
            {usage.requests} requests{usage.refused ? `, ${usage.refused} refused` : ""}
            {usage.model ? `, model ${usage.model}` : ""}, {usage.sessions.length} sessions
          </span>
        </div>
      )}
      {items && shown.length === 0 && <p className="muted">No conversation yet.</p>}
      {shown.length > 0 && (
        <ol className="ai-conversation">
          {shown.map((x) => (
            <li key={x.id} data-exchange={x.id} className={x.agent_id ? "subagent" : ""}>
              <div className="ai-meta muted">
                {new Date(x.at).toLocaleTimeString()}
                {x.agent_id ? ` · subagent ${x.agent_id.slice(0, 8)}` : ""}
                {x.model ? ` · ${x.model}` : ""}
                {x.usage?.output_tokens != null ? ` · ${x.usage.input_tokens ?? 0} in / ${x.usage.output_tokens} out` : ""}
              </div>
              {x.messages.flatMap((m, i) =>
                blocksOf(m)
                  .filter((b) => !isReminder(b) && m.role !== "system")
                  .map((b, j) => <Block key={`${i}-${j}`} block={b} who={m.role === "assistant" ? "claude" : "candidate"} />),
              )}
              {x.refused && <p className="error">refused ({x.refused}): {x.error}</p>}
              {!x.refused && x.error && <p className="error">{x.error}</p>}
              {(x.answer?.content ?? []).map((b, j) => (
                <Block key={`a-${j}`} block={b} who="claude" />
              ))}
            </li>
          ))}
        </ol>
      )}
    </section>
  );
}
