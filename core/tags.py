"""Tags that several layers name (the tokenizer that has them, the config that defaults to them, the rewards
that read around them), defined once. Light on purpose: reward workers import it."""

# Tool-integrated reasoning (rlhf.tool_calls): a call opens and closes, then the tool's output does.
TOOL_TAGS: tuple[str, str, str, str] = ("<tool>", "</tool>", "<output>", "</output>")
