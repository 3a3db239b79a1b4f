"""crackjax: transfer learning that labels concrete photos as cracked or uncracked."""

__version__ = "0.1.0"
