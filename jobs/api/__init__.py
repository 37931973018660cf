"""The JSON API: views, the Server-Sent Events stream, and caller authentication."""
