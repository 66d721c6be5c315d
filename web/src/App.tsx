import { useState } from "react";
import { Api } from "./api";
import { Candidate } from "./components/Candidate";
import { Dashboard } from "./components/Dashboard";
import { SandboxPage } from "./components/SandboxPage";
import { SignIn } from "./components/SignIn";
import { navigate, usePath } from "./router";

// The key lives for this tab only (sessionStorage): closing the tab signs out.
const KEY = "sandbox-engine.key";

export function App() {
  const path = usePath();
  const [key, setKey] = useState<string | null>(() => sessionStorage.getItem(KEY));

  const candidate = path.match(/^\/s\/([^/]+)$/);
  if (candidate) return <Candidate token={decodeURIComponent(candidate[1])} />;

  if (!key) {
    return (
      <SignIn
        onSignIn={(k) => {
          sessionStorage.setItem(KEY, k);
          setKey(k);
        }}
      />
    );
  }
  const api = new Api(key);
  const signOut = () => {
    sessionStorage.removeItem(KEY);
    setKey(null);
    navigate("/");
  };
  const sandbox = path.match(/^\/sandboxes\/([a-z0-9]+)$/);
  return (
    <div className="app">
      <header className="bar">
        <a
          className="brand"
          href="/"
          onClick={(e) => {
            e.preventDefault();
            navigate("/");
          }}
        >
          Sandbox Engine
        </a>
        <button className="link" onClick={signOut}>
          Sign out
        </button>
      </header>
      {sandbox ? <SandboxPage api={api} id={sandbox[1]} /> : <Dashboard api={api} onUnauthorized={signOut} />}
    </div>
  );
}
