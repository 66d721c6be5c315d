"""Terminal sessions: the shell in a sandbox's workspace behind one WebSocket.

``session.TerminalSession`` owns a connection's whole life — the shell handshake (tmux, so a
reconnect finds the same shell), read-only watching, recording, activity and idle periods,
submit detection and the hang-up; ``api/terminal.py`` only carries frames to and from it.
``recordings`` writes sessions as asciicast v2 files and their rows.
"""
