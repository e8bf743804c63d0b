"""Build a notebook from a percent-format script (a writing aid for long notebooks).

Cells start with a line `# %%` (code) or `# %% [markdown]` (markdown; each line's leading `# ` is removed).
Usage: python tools/py2nb.py SRC.py nbs/NN_name.ipynb [--execute]
The notebook in nbs/ stays the source of truth: run this once to create it, then edit the notebook.
"""
import sys, subprocess, nbformat
from pathlib import Path

def parse(text):
    "Split percent-format text into (kind, source) cells."
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        src = '\n'.join(buf).strip('\n')
        if kind == 'markdown': src = '\n'.join(l[2:] if l.startswith('# ') else l.lstrip('#') for l in src.split('\n'))
        cells.append((kind, src))
    for line in text.split('\n'):
        if line.startswith('# %%'):
            flush(); buf = []
            kind = 'markdown' if '[markdown]' in line else 'code'
        else: buf.append(line)
    flush()
    return cells

def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    for kind, s in parse(src.read_text()):
        nb.cells.append(nbformat.v4.new_markdown_cell(s) if kind == 'markdown' else nbformat.v4.new_code_cell(s))
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(dst))
    if '--execute' in sys.argv:
        subprocess.run([sys.executable, '-m', 'jupyter', 'nbconvert', '--to', 'notebook', '--execute', '--inplace',
                        '--ExecutePreprocessor.timeout=600', str(dst)], check=True, cwd=dst.parent)

if __name__ == '__main__': main()
