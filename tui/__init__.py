"""`nanovllm top`: a live Textual dashboard of a running server.

`cli.py` registers the command (Textual loads only when it runs), `client.py` polls /metrics and
/v1/engine/state, `model.py` turns polls into figures, `widgets.py` and `app.py` draw them.
"""
