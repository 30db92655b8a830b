"""End-to-end tests of the vLLM plugin; they need the vLLM environment (README: "Serving with vLLM")."""
