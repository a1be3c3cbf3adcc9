#!/usr/bin/env python3
"""The size of the reference against its aims: `make stats`.

Lines of code are physical lines holding a token that is not a comment, excluding docstrings and blank lines,
counted per `# ---- N. Title` section of ddpm.py; sections 1-5 are the paper block, the rest is the harness.
Prints one row per aim with its measured value and whether it holds; exits 1 if one does not.
"""
import ast
import io
import re
import sys
import tokenize

AIMS = {"ddpm.py lines of code": 1000, "ddpm.py physical lines": 1400, "ddpm.py harness lines of code": 560,
        "longest function in ddpm.py": 60, "README.md lines": 250}


def code_lines(source):
    """The line numbers that hold code: tokens other than comments and newlines, minus docstrings."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstrings


def main():
    source = open("ddpm.py").read()
    text, code = source.splitlines(), code_lines(source)
    heads = [(i + 1, m.group(1), line) for i, line in enumerate(text) if (m := re.match(r"^# -+ *(\d+)\. ", line))]
    bounds = [(1, "0", "# preamble")] + heads + [(len(text) + 1, None, None)]
    core = 0
    for (start, number, title), (end, _, _) in zip(bounds, bounds[1:]):
        n = sum(start <= line < end for line in code)
        core += n if number in {"1", "2", "3", "4", "5"} else 0
        print(f"{n:5d} lines of code  {title.strip('# -')[:90]}")
    functions = [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    longest = max(functions)
    measured = {"ddpm.py lines of code": len(code), "ddpm.py physical lines": len(text),
                "ddpm.py harness lines of code": len(code) - core, "longest function in ddpm.py": longest[0],
                "README.md lines": len(open("README.md").read().splitlines())}
    print(f"\nthe paper block (sections 1-5): {core} lines of code; longest function: {longest[1]}")
    failed = False
    for name, aim in AIMS.items():
        holds = measured[name] <= aim
        failed |= not holds
        print(f"{name:<32} {measured[name]:5d}  aim <= {aim:<5d} {'holds' if holds else 'OVER'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
