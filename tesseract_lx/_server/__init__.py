"""The server side: `tesseract-lx serve`, tesseract-core's app plus batched endpoints.

Deployed next to the Tesseract (in its container). Shares only `.._wire` with the
client side; nothing on the client side imports this package.
"""
