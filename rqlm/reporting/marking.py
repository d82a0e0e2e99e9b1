"""Reconstructed text with the tokens a VAE got wrong marked, for a terminal or an HTML page."""

from __future__ import annotations

import html

RED, RESET = "\033[41m", "\033[0m"


def marked_text(tokenizer, original: list[int], reconstructed: list[int], style: str) -> str:
    """Reconstructed text with the tokens that differ from the original marked ('ansi' or 'html')."""
    parts = []
    for want, got in zip(original, reconstructed):
        piece = tokenizer.decode([got])
        if style == "html":
            piece = html.escape(piece)
            parts.append(piece if want == got else f"<mark title=\"{html.escape(repr(tokenizer.decode([want])))}\">{piece}</mark>")
        else:
            parts.append(piece if want == got else f"{RED}{piece}{RESET}")
    return "".join(parts)

