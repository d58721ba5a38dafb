"""The web page served at /: a chat playground over /v1/chat/completions and a live dashboard over
/metrics/live. Static files only (HTML, ES modules, CSS in `static/`), built by nobody: no Node, no CDN."""
