"""What the app says."""


def greet(greeting: str, who: str) -> str:
    return f"{greeting}, {who}!"
