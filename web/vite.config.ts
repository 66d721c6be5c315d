import react from "@vitejs/plugin-react";
import { defineConfig } from "vitest/config";

// The API serves the built files at "/" (api/app.py); `npm run dev` proxies the API to a
// local engine on :8000.
export default defineConfig({
  plugins: [react()],
  // React and xterm.js make one ~570 kB chunk (158 kB gzipped): fine for this app.
  build: { outDir: "dist", emptyOutDir: true, sourcemap: false, chunkSizeWarningLimit: 800 },
  server: {
    proxy: { "/api": { target: "http://127.0.0.1:8000", ws: true } },
  },
  test: { environment: "jsdom", globals: true },
});
