"""Build the documentation site from the notebooks without Quarto: nbs/**/*.ipynb -> _site/*.html.

`nbdev-docs` (Quarto) builds the standard site where Quarto is installed; this script builds a plain static site
of the same notebooks on machines without it, following nbdev's conventions (see `nbdev.processors`):

- the home page is nbs/index.ipynb; the sidebar follows nbs/sidebar.yml (entries whose notebook does not exist are
  skipped, notebooks that exist but are not listed are appended under "More"), page names as nbdev's
  (`00_core.ipynb` -> `core.html`, `tutorials/quick_start.ipynb` -> `tutorials/quick_start.html`);
- the first markdown cell `# Title` / `> summary` gives the page title and description;
- `#| hide` cells and `include: false` cells are dropped; the code of `#| export`, `#| exporti` and
  `#| default_exp` cells is removed and every public function/class of an `export`/`exports` cell is documented
  in place (signature with docments + docstring, rendered by `fastcore.docments.MarkdownRenderer`, the renderer
  behind `nbdev.showdoc.show_doc`) from the exported module, which is imported, never the notebook executed;
  `#| exports` code is shown folded after its entry; explicit `show_doc(x)` cells are rendered the same way;
- everything else shows its source (syntax-highlighted) and its STORED outputs (text, HTML tables, PNG/JPEG/SVG
  figures embedded in the page, markdown); notebooks are not executed, so a build takes seconds.

Usage: python tools/build_docs.py [--out _site] [--nbs nbs] [-q]. Exits 1 with a message naming the notebook when
one cannot be rendered (unreadable notebook, exported name missing from its module, module that fails to import).
"""
from __future__ import annotations
import argparse, ast, base64, html, importlib, inspect, json, os, re, shutil, sys, tempfile, time, warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat, yaml
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer, get_lexer_by_name
from pygments.util import ClassNotFound

ROOT = Path(__file__).resolve().parents[1]
LIB = 'fsmis'

class BuildError(Exception):
    "A notebook or the site configuration cannot be rendered."

# ---------------------------------------------------------------------------------------------------------------
# Notebooks, page names and navigation

def page_name(rel: Path) -> Path:
    "nbdev's page for the notebook at `rel` (relative to nbs/): drop a leading number prefix, lower case, .html."
    return rel.with_name(re.sub(r'^\d+[a-zA-Z0-9]*_', '', rel.name.lower())).with_suffix('.html')

def find_notebooks(nbs: Path) -> list[Path]:
    "All notebooks under `nbs` (relative paths), skipping files and folders starting with `_` or `.` as nbdev does."
    res = []
    for p in sorted(nbs.rglob('*.ipynb')):
        rel = p.relative_to(nbs)
        if any(part[0] in '._' for part in rel.parts): continue
        res.append(rel)
    return res

def _sidebar_entries(contents, section, out):
    "Flatten quarto sidebar `contents` into (section, path) pairs."
    if isinstance(contents, (str, dict)): contents = [contents]
    for e in contents or []:
        if isinstance(e, str): out.append((section, e))
        elif isinstance(e, dict):
            if 'section' in e or 'contents' in e:
                sec = e.get('section', section)
                if isinstance(sec, dict): sec = sec.get('text', section)
                _sidebar_entries(e.get('contents', []), sec if isinstance(sec, str) else section, out)
            elif 'href' in e: out.append((section, e['href']))
            elif 'file' in e: out.append((section, e['file']))
    return out

@dataclass
class Page:
    nb: Path           # notebook, relative to nbs/
    html: Path         # page, relative to the site root
    section: str | None
    title: str = ''
    description: str = ''

def site_pages(nbs: Path) -> list[Page]:
    "Pages in navigation order: index first, then nbs/sidebar.yml order (missing ones skipped), then the rest."
    existing = find_notebooks(nbs)
    if Path('index.ipynb') not in existing: raise BuildError(f'{nbs/"index.ipynb"}: the home page notebook is missing')
    order = []
    sb = nbs/'sidebar.yml'
    if sb.exists():
        try: cfg = yaml.safe_load(sb.read_text()) or {}
        except yaml.YAMLError as e: raise BuildError(f'{sb}: not valid YAML: {e}') from e
        sidebar = (cfg.get('website') or {}).get('sidebar') or {}
        if isinstance(sidebar, list): sidebar = sidebar[0] if sidebar else {}
        contents = sidebar.get('contents', []) if isinstance(sidebar, dict) else []
        if contents != 'auto': order = _sidebar_entries(contents, None, [])
    seen, pages = set(), []
    def add(rel, section):
        if rel in seen or rel not in existing: return
        seen.add(rel); pages.append(Page(rel, page_name(rel), section))
    add(Path('index.ipynb'), None)
    for section, p in order: add(Path(os.path.normpath(p)), section)
    for rel in existing: add(rel, 'More')
    names = {}
    for pg in pages:
        if pg.html in names: raise BuildError(f'{nbs/pg.nb} and {nbs/names[pg.html]} would both become {pg.html}')
        names[pg.html] = pg.nb
    return pages

def site_config(nbs: Path) -> dict:
    "Site title, description and repository from nbs/nbdev.yml (falls back to the package name)."
    title, desc, repo = LIB, '', ''
    f = nbs/'nbdev.yml'
    if f.exists():
        w = (yaml.safe_load(f.read_text()) or {}).get('website') or {}
        title, desc, repo = w.get('title', title), w.get('description', desc), w.get('repo-url', repo)
    return dict(title=title, description=desc, repo=repo)

# ---------------------------------------------------------------------------------------------------------------
# Cells: directives, exported names

_re_dir = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
_re_dash_hdr = re.compile(r'^#+\s+.*\s+-\s*$')
_strip_magics = re.compile(r'^\s*(%load_ext|%autoreload|%reload_ext|%matplotlib|%config)\b.*$\n?', re.M)

def split_directives(src: str) -> tuple[dict, str]:
    "`#| key: value` / `#| key args` lines at the top of a cell -> ({key: value}, remaining source)."
    lines, d = src.splitlines(), {}
    i = 0
    while i < len(lines):
        ln = lines[i]
        m = _re_dir.match(ln)
        if m: d[m.group(1).lower()] = m.group(2); i += 1
        elif not ln.strip(): i += 1
        else: break
    body = [l for l in lines[i:] if not re.search(r'#\|\s*hide_line\s*$', l)]
    return d, '\n'.join(body).strip('\n')

def _false(v): return str(v).strip().lower() in ('false', 'no', '0')

def _parse(src):
    "AST of a code cell, or None when it is not plain python (magics, shell escapes)."
    try: return ast.parse(src)
    except SyntaxError: return None

def _patch_name(node):
    "`Class.method` for a `@patch`-decorated function (as nbdev names it), else None."
    for dec in getattr(node, 'decorator_list', []):
        d = dec.func if isinstance(dec, ast.Call) else dec
        if getattr(d, 'id', None) in ('patch', 'patch_to') or getattr(d, 'attr', None) in ('patch', 'patch_to'):
            if isinstance(dec, ast.Call) and dec.args:
                a = dec.args[0]
                return f'{getattr(a, "id", "?")}.{node.name}'
            args = node.args.args
            if args and args[0].annotation is not None:
                ann = args[0].annotation
                if isinstance(ann, ast.Name): return f'{ann.id}.{node.name}'
                if isinstance(ann, ast.Tuple): return [f'{e.id}.{node.name}' for e in ann.elts if isinstance(e, ast.Name)]
    return None

def exported_names(src: str) -> list[str]:
    "Public functions and classes defined at the top level of an exported cell, as nbdev's `add_show_docs` picks."
    tree = _parse(src)
    if tree is None: return []
    res = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): continue
        if node.name.startswith('_') and not node.name.startswith('__'): continue
        pn = _patch_name(node) if not isinstance(node, ast.ClassDef) else None
        if isinstance(pn, list): res.extend(pn)
        else: res.append(pn or node.name)
    return res

_re_showdoc_call = re.compile(r'^show_doc\(\s*([A-Za-z_][\w.]*)\s*(?:,\s*name\s*=\s*([\'"])(.*?)\2\s*)?[^)]*\)\s*$')

def showdoc_targets(src: str) -> list[tuple[str, str | None]] | None:
    "[(symbol, display name)] when every line of `src` is a `show_doc(sym)` call, else None."
    lines = [l.strip() for l in src.splitlines() if l.strip() and not l.strip().startswith('#')]
    if not lines: return None
    res = []
    for l in lines:
        m = _re_showdoc_call.match(l)
        if not m: return None
        res.append((m.group(1), m.group(3)))
    return res

# ---------------------------------------------------------------------------------------------------------------
# Markdown and code rendering

_fmt = HtmlFormatter(nowrap=True)

def highlight_code(code: str, lang: str = 'python') -> str:
    "Syntax-highlighted `<pre>` block."
    try: lexer = PythonLexer() if lang in ('python', 'py', '') else None if lang == 'text' else get_lexer_by_name(lang)
    except ClassNotFound: lexer = None
    inner = highlight(code, lexer, _fmt) if lexer else html.escape(code)
    return f'<pre class="sourceCode {html.escape(lang or "")}"><code>{inner}</code></pre>'

def _math_rule(state, silent):
    "Inline `$...$` / `$$...$$` math kept verbatim (no emphasis inside), shown as plain text."
    src, pos = state.src, state.pos
    if src[pos] != '$': return False
    dbl = src.startswith('$$', pos)
    delim = '$$' if dbl else '$'
    start = pos + len(delim)
    if not dbl and (start >= len(src) or src[start] in ' \t\n'): return False
    end = src.find(delim, start)
    while end != -1 and src[end-1] == '\\': end = src.find(delim, end + 1)
    if end == -1 or end == start: return False
    if not dbl and (src[end-1] in ' \t\n' or (end + 1 < len(src) and src[end+1].isdigit())): return False
    if not silent:
        tok = state.push('math_inline', 'span', 0)
        tok.content, tok.markup = src[start:end], delim
    state.pos = end + len(delim)
    return True

def _render_math(self, tokens, idx, options, env):
    t = tokens[idx]
    cls = 'math display' if t.markup == '$$' else 'math inline'
    return f'<span class="{cls}">{html.escape(t.markup + t.content + t.markup)}</span>'

def make_md() -> MarkdownIt:
    md = MarkdownIt('commonmark', {'html': True, 'highlight': lambda code, lang, attrs: highlight_code(code, lang or 'text')})
    md.enable(['table', 'strikethrough'])
    md.inline.ruler.before('escape', 'math', _math_rule)
    md.add_render_rule('math_inline', _render_math)
    return md

def _fenced_divs(text: str) -> str:
    "Quarto fenced divs (`::: {.callout-note}` ... `:::`) -> HTML divs around the markdown they hold."
    if ':::' not in text: return text
    def open_div(m):
        classes = ' '.join(c.lstrip('.') for c in m.group(1).split() if c.startswith('.'))
        return f'\n<div class="{html.escape(classes)}">\n\n'
    text = re.sub(r'^:::+[ \t]*\{([^}]*)\}[ \t]*$', open_div, text, flags=re.M)
    text = re.sub(r'^:::+[ \t]*(\w[\w-]*)[ \t]*$', lambda m: f'\n<div class="{m.group(1)}">\n\n', text, flags=re.M)
    return re.sub(r'^:::+[ \t]*$', '\n</div>\n', text, flags=re.M)

def slugify(text: str) -> str:
    s = re.sub(r'<[^>]+>', '', text).strip().lower()
    s = re.sub(r'[^\w\s.-]', '', s)
    return re.sub(r'\s+', '-', s) or 'section'

def _strip_ansi(s): return re.sub(r'\x1B(?:[@-Z\\-_]|\[[0-?]*[ -/]*[@-~])', '', s)

# ---------------------------------------------------------------------------------------------------------------
# Building one page

@dataclass
class Ctx:
    "Site-wide state shared by the pages."
    nbs: Path
    out: Path
    pages: list
    symbols: dict = field(default_factory=dict)   # name -> (page html path, anchor)
    by_nb: dict = field(default_factory=dict)     # notebook rel path -> Page
    assets: set = field(default_factory=set)      # files under nbs/ referenced by pages, copied to the site
    md: MarkdownIt = field(default_factory=make_md)
    warnings: list = field(default_factory=list)
    css: list = field(default_factory=list)       # nbs/*.css copied to the site root and linked by every page
    mods: dict = field(default_factory=dict)      # module name -> its namespace

    def module_ns(self, mod: str, nb: Path) -> dict:
        "Namespace of the exported module `mod` (imported once), the source of the API entries of notebook `nb`."
        name = _modname(mod)
        if name not in self.mods:
            try:
                with warnings.catch_warnings():   # deprecation chatter of third-party imports is not the docs' business
                    warnings.simplefilter('ignore')
                    self.mods[name] = vars(importlib.import_module(name))
            except Exception as e:
                raise BuildError(f'{self.nbs/nb}: cannot import {name} (needed for its API reference): {type(e).__name__}: {e}') from e
        return self.mods[name]

class PageRenderer:
    "Renders one notebook to the HTML body of its page, plus its table of contents."
    def __init__(self, ctx: Ctx, page: Page, nb):
        self.ctx, self.page, self.nb = ctx, page, nb
        self.ids, self.toc, self.parts = set(), [], []
        self.module = None
        self.ns = {}

    # -- links
    def rel(self, target: Path) -> str:
        "URL of site path `target` from this page."
        return os.path.relpath(target, self.page.html.parent).replace(os.sep, '/')

    def fix_href(self, href: str) -> str:
        if not href or re.match(r'^[a-zA-Z][\w+.-]*:|^#|^/', href): return href
        path, _, frag = href.partition('#')
        target = os.path.normpath(self.page.nb.parent/path)
        if target.startswith('..'): return href
        t = Path(target)
        if t.suffix == '.ipynb':
            pg = self.ctx.by_nb.get(t)
            if pg is None: return href
            return self.rel(pg.html) + ('#' + frag if frag else '')
        if (self.ctx.nbs/t).is_file(): self.ctx.assets.add(t)
        return href

    def uid(self, base: str) -> str:
        i, cand = 0, base
        while cand in self.ids: i += 1; cand = f'{base}-{i}'
        self.ids.add(cand)
        return cand

    # -- markdown
    def markdown(self, text: str, attachments=None, toc=True, linkify=True) -> str:
        md, env = self.ctx.md, {}
        text = _fenced_divs(text)
        tokens = md.parse(text, env)
        for i, t in enumerate(tokens):
            if t.type == 'heading_open':
                inline = tokens[i+1]
                anchor = self.uid(slugify(inline.content))
                t.attrSet('id', anchor)
                if toc and t.tag in ('h2', 'h3'): self.toc.append((int(t.tag[1]), inline.content, anchor))
            if t.type == 'inline' and t.children: self._inline(t.children, attachments, linkify)
        return md.renderer.render(tokens, md.options, env)

    def _inline(self, children, attachments, linkify):
        depth = 0
        for c in children:
            if c.type == 'link_open':
                depth += 1
                c.attrSet('href', self.fix_href(c.attrGet('href') or ''))
            elif c.type == 'link_close': depth -= 1
            elif c.type == 'image':
                src = c.attrGet('src') or ''
                if src.startswith('attachment:') and attachments:
                    att = attachments.get(src[len('attachment:'):], {})
                    mime = next((m for m in att if m.startswith('image/')), None)
                    if mime:
                        data = att[mime] if isinstance(att[mime], str) else ''.join(att[mime])
                        c.attrSet('src', f'data:{mime};base64,{data}' if mime != 'image/svg+xml' else
                                  'data:image/svg+xml;base64,' + base64.b64encode(data.encode()).decode())
                else: c.attrSet('src', self.fix_href(src))
            elif c.type == 'code_inline' and depth == 0 and linkify:
                link = self.symbol_link(c.content)
                if link:
                    c.type, c.content = 'html_inline', f'<a href="{link}" class="api-link"><code>{html.escape(c.content)}</code></a>'

    def symbol_link(self, code: str) -> str | None:
        name = code.strip()
        if name.endswith('()'): name = name[:-2]
        if not re.fullmatch(r'[A-Za-z_][\w.]*', name): return None
        cands = [name]
        if name.startswith(LIB + '.'): cands.append(name.rsplit('.', 1)[-1])
        for c in cands:
            if c in self.ctx.symbols:
                html_path, anchor = self.ctx.symbols[c]
                return self.rel(html_path) + ('#' + anchor if anchor else '')
        return None

    # -- API entries
    def api_entry(self, name: str, obj, display: str | None = None) -> str:
        from fastcore.docments import MarkdownRenderer
        display = display or name
        try:
            text = MarkdownRenderer(obj, name=display, title_level=3)._repr_markdown_()
            if inspect.isclass(obj): text = re.sub(r'^(```python\n)def ', r'\1class ', text, count=1, flags=re.M)
        except Exception as e:  # renderer quirks on unusual objects: fall back to the docstring, say so
            self.ctx.warnings.append(f'{self.ctx.nbs/self.page.nb}: show_doc({name}) fell back to the docstring ({type(e).__name__}: {e})')
            text = f'```python\n{display}\n```\n\n*{inspect.getdoc(obj) or ""}*'
        anchor = self.api_anchor(name)
        self.toc.append((3, display, anchor))
        body = self.markdown(text, toc=False, linkify=False)
        return f'<div class="api-entry" id="{anchor}"><h3 class="api-name"><a href="#{anchor}"><code>{html.escape(display)}</code></a></h3>\n{body}</div>'

    def api_anchor(self, name):
        a = name.lower()
        if a not in self.ids: self.ids.add(a)
        return a

    # -- cells
    def outputs(self, outs, asis=False) -> str:
        res, stream = [], None
        def flush():
            nonlocal stream
            if stream is not None:
                res.append(f'<pre class="output-stream">{html.escape(_strip_ansi(stream))}</pre>')
                stream = None
        for o in outs:
            ot = o.get('output_type')
            if ot == 'stream':
                stream = (stream or '') + (o.get('text') if isinstance(o.get('text'), str) else ''.join(o.get('text', [])))
                continue
            flush()
            if ot == 'error':
                tb = '\n'.join(o.get('traceback') or [f"{o.get('ename')}: {o.get('evalue')}"])
                res.append(f'<pre class="output-error">{html.escape(_strip_ansi(tb))}</pre>')
            elif ot in ('execute_result', 'display_data'):
                res.append(self.mime(o.get('data', {}), o.get('metadata', {}), asis))
        flush()
        res = [r for r in res if r]
        return f'<div class="cell-output">{"".join(res)}</div>' if res else ''

    def mime(self, data, meta, asis=False) -> str:
        def txt(k):
            v = data[k]
            return v if isinstance(v, str) else ''.join(v)
        if 'application/vnd.jupyter.widget-view+json' in data:
            img = next((k for k in ('image/png', 'image/jpeg') if k in data), None)
            still = self.mime({img: data[img]}, meta) if img else ''
            return ('<div class="widget-note">Interactive widget: open the notebook in Jupyter to use it.'
                    f'</div>{still}')
        for k in ('image/png', 'image/jpeg', 'image/gif'):
            if k in data:
                m = meta.get(k, {}) if isinstance(meta.get(k), dict) else {}
                size = ''.join(f' {a}="{int(m[a])}"' for a in ('width', 'height') if a in m)
                b64 = txt(k).replace('\n', '')
                return f'<div class="output-image"><img src="data:{k};base64,{b64}"{size} alt="figure"></div>'
        if 'image/svg+xml' in data: return f'<div class="output-image">{txt("image/svg+xml")}</div>'
        if 'text/html' in data:
            h = txt('text/html')
            if '<script' in h.lower() and 'text/plain' in data and 'dataframe' not in h:
                return f'<pre class="output-text">{html.escape(_strip_ansi(txt("text/plain")))}</pre>'
            return f'<div class="output-html">{h}</div>'
        if 'text/markdown' in data:
            m = re.sub(r'\{[^{}\n]*target=[^{}\n]*\}', '', txt('text/markdown'))
            return f'<div class="output-markdown">{self.markdown(m, toc=False)}</div>'
        if 'text/latex' in data: return f'<pre class="output-text">{html.escape(txt("text/latex"))}</pre>'
        if 'text/plain' in data: return f'<pre class="output-text">{html.escape(_strip_ansi(txt("text/plain")))}</pre>'
        return ''

    def code_block(self, src, lang, fold=None) -> str:
        block = highlight_code(src, lang)
        if fold:
            return (f'<details class="code-fold"{" open" if fold == "show" else ""}><summary>{html.escape(fold if fold not in ("show", "true") else "Code")}</summary>{block}</details>')
        return block

    def render(self):
        nb, cells = self.nb, self.nb.cells
        lang = (nb.metadata.get('kernelspec') or {}).get('language') or (nb.metadata.get('language_info') or {}).get('name') or 'python'
        # frontmatter: raw '---' yaml cell and/or first markdown cell '# Title\n> description'
        first_md = next((i for i, c in enumerate(cells) if c.cell_type == 'markdown'), None)
        fm = {}
        for c in cells:
            if c.cell_type == 'raw' and c.source.strip().startswith('---'):
                try: fm.update(yaml.safe_load(c.source.strip().strip('-')) or {})
                except yaml.YAMLError: pass
        # default_exp module, imported for the API entries
        default_exp = None
        for c in cells:
            if c.cell_type != 'code': continue
            d, _ = split_directives(c.source)
            if 'default_exp' in d: default_exp = d['default_exp'].split()[0]; break
        if default_exp: self.ns = self.ctx.module_ns(default_exp, self.page.nb)
        shown = set()
        for c in cells:
            if c.cell_type == 'code':
                t = showdoc_targets(split_directives(c.source)[1])
                if t: shown.update(n for n, _ in t)
        for i, c in enumerate(cells):
            if c.cell_type == 'markdown':
                src = c.source
                if i == first_md:
                    m = re.match(r'^\s*#\s+(.+?)\s*$', src.split('\n', 1)[0])
                    if m:
                        rest = src.split('\n', 1)[1] if '\n' in src else ''
                        self.page.title = self.page.title or m.group(1)
                        dl = []
                        lines = rest.split('\n')
                        while lines and (lines[0].startswith('>') or (not lines[0].strip() and not dl)):
                            if lines[0].startswith('>'): dl.append(lines[0].lstrip('>').strip())
                            lines.pop(0)
                        if dl: self.page.description = ' '.join(dl)
                        src = '\n'.join(l for l in lines if not re.match(r'^\s*-\s+\w+\s*:\s', l) or l.strip().startswith('- [')).strip()
                        if not src: continue
                if _re_dash_hdr.match(src.strip()) and '\n' not in src.strip(): continue
                self.parts.append(f'<div class="cell markdown">{self.markdown(src, c.get("attachments"))}</div>')
            elif c.cell_type == 'code':
                self.parts.append(self.code_cell(c, lang, default_exp, shown))
        if fm.get('title'): self.page.title = str(fm['title'])
        if fm.get('description'): self.page.description = str(fm['description'])
        if not self.page.title: self.page.title = self.page.nb.stem
        return ''.join(p for p in self.parts if p)

    def code_cell(self, c, lang, default_exp, shown) -> str:
        d, src = split_directives(c.source)
        if 'hide' in d or _false(d.get('include', '')): return ''
        src = _strip_magics.sub('', src).strip('\n')
        outs = c.get('outputs', [])
        res = []
        exp = next((k for k in ('export', 'exports', 'exporti') if k in d), None)
        if exp or 'default_exp' in d:
            # the code is not shown, so neither is its stderr chatter (import-time warnings)
            outs = [o for o in outs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
            if exp in ('export', 'exports'):
                mod = d[exp].split()[0] if d[exp].split() else default_exp
                names = [n for n in exported_names(src) if n not in shown]
                if names and mod is None:
                    raise BuildError(f'{self.ctx.nbs/self.page.nb}: cell {c.get("id", "?")} exports {names} but the notebook has no `#| default_exp`')
                ns = self.ns if mod == default_exp else self.ctx.module_ns(mod, self.page.nb)
                for n in names:
                    try: obj = _getpath(ns, n)
                    except (KeyError, AttributeError):
                        raise BuildError(f'{self.ctx.nbs/self.page.nb}: `{n}` is exported by the notebook but missing from '
                                         f'module {_modname(mod)}; run nbdev-export') from None
                    res.append(self.api_entry(n, obj))
                if exp == 'exports': res.append(self.code_block(src, lang, fold='Exported source'))
            res.append(self.outputs(outs))
            return ''.join(r for r in res if r)
        targets = showdoc_targets(src)
        if targets is not None:
            ok = []
            for n, disp in targets:
                try: ok.append(self.api_entry(n, _getpath(self.ns, n), disp))
                except (KeyError, AttributeError): ok = None; break
            if ok is not None: return ''.join(ok)
            return self.outputs(outs, asis=True)   # a symbol not in the module namespace: use the stored output
        if re.search(r'^show_doc', src, re.M): d.setdefault('echo', 'false')
        if src and not _false(d.get('echo', '')):
            fold = d.get('code-fold')
            fold = None if fold in (None, '', 'false') else ('show' if fold == 'show' else 'Code')
            res.append(self.code_block(src, lang, fold))
        if not _false(d.get('output', '')): res.append(self.outputs(outs, asis=d.get('output') == 'asis'))
        body = ''.join(r for r in res if r)
        return f'<div class="cell code">{body}</div>' if body else ''

def _modname(mod): return mod if mod.startswith(LIB + '.') or mod == LIB else f'{LIB}.{mod}'

def _getpath(ns: dict, name: str):
    parts = name.split('.')
    obj = ns[parts[0]]
    for p in parts[1:]: obj = getattr(obj, p)
    return obj

def collect_symbols(ctx: Ctx, nbs_cache: dict):
    "First pass: every documented name -> (page, anchor), for backtick links across pages."
    for pg in ctx.pages:
        nb = nbs_cache[pg.nb]
        names = []
        for c in nb.cells:
            if c.cell_type != 'code': continue
            d, src = split_directives(c.source)
            if 'hide' in d: continue
            exp = next((k for k in ('export', 'exports') if k in d), None)
            if exp: names += exported_names(src)
            t = showdoc_targets(src)
            if t: names += [n for n, _ in t]
        for n in names:
            ctx.symbols.setdefault(n, (pg.html, n.lower()))
        mod = next((split_directives(c.source)[0].get('default_exp') for c in nb.cells if c.cell_type == 'code'
                    and 'default_exp' in split_directives(c.source)[0]), None)
        if mod: ctx.symbols.setdefault(_modname(mod.split()[0]), (pg.html, ''))

# ---------------------------------------------------------------------------------------------------------------
# Page template

CSS = """
:root { --fg:#212529; --muted:#6c757d; --accent:#2c6fbb; --bg-code:#f6f8fa; --border:#dee2e6; --nav-w:260px; }
* { box-sizing: border-box; }
body { margin:0; font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color:var(--fg); line-height:1.55; font-size:16px; background:#fff; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
header.navbar { background:var(--accent); color:#fff; padding:.6rem 1.2rem; display:flex; align-items:baseline; gap:1rem;
                position:sticky; top:0; z-index:10; }
header.navbar a.site-title { color:#fff; font-weight:700; font-size:1.25rem; }
header.navbar .site-desc { color:#e3ecf7; font-size:.9rem; overflow:hidden; white-space:nowrap; text-overflow:ellipsis; }
.layout { display:flex; align-items:flex-start; }
nav.sidebar { width:var(--nav-w); flex:0 0 var(--nav-w); padding:1rem .8rem 2rem 1.2rem; position:sticky; top:3rem;
              max-height:calc(100vh - 3rem); overflow-y:auto; font-size:.93rem; border-right:1px solid var(--border); }
nav.sidebar ul { list-style:none; margin:0; padding:0; }
nav.sidebar li a { display:block; padding:.18rem .5rem; border-radius:4px; color:var(--fg); }
nav.sidebar li a:hover { background:#eef3f9; text-decoration:none; }
nav.sidebar li a.active { background:#dce8f6; color:var(--accent); font-weight:600; }
nav.sidebar .section { margin-top:.9rem; font-weight:700; color:var(--muted); text-transform:uppercase; font-size:.75rem;
                       letter-spacing:.04em; padding-left:.5rem; }
main.content { flex:1 1 auto; min-width:0; max-width:920px; padding:1.2rem 2rem 3rem; }
aside.toc { flex:0 0 220px; padding:1.2rem 1rem; position:sticky; top:3rem; max-height:calc(100vh - 3rem); overflow-y:auto;
            font-size:.85rem; }
aside.toc ul { list-style:none; padding-left:0; margin:0; } aside.toc li.l3 { padding-left:.9rem; }
aside.toc .toc-title { font-weight:700; margin-bottom:.3rem; }
h1.title { margin:.2rem 0 .2rem; font-size:2.1rem; }
div.description { color:var(--muted); margin-bottom:1.4rem; }
h2 { border-bottom:1px solid var(--border); padding-bottom:.2rem; margin-top:2rem; }
pre { background:var(--bg-code); padding:.65rem .8rem; border-radius:5px; overflow-x:auto; font-size:.85rem; line-height:1.4; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size:.9em; }
p code, li code, td code { background:var(--bg-code); padding:.05rem .25rem; border-radius:3px; }
.cell { margin-bottom:1rem; }
.cell-output pre { background:none; border-left:2px solid lightsalmon; border-radius:0; margin:.2rem 0 .2rem .8rem; }
.cell-output pre.output-error { border-left-color:#d9534f; color:#a12622; }
.output-image img { max-width:100%; height:auto; }
.output-html, .output-markdown { overflow-x:auto; margin-left:.8rem; }
table { border-collapse:collapse; margin:.6rem 0; font-size:.88rem; }
th, td { border:1px solid var(--border); padding:.25rem .55rem; text-align:left; vertical-align:top; }
th { background:#f1f3f5; } table.dataframe td { text-align:right; }
.api-entry { border:1px solid var(--border); border-radius:6px; padding:.2rem 1rem .4rem; margin:1.2rem 0;
             box-shadow:0 1px 2px rgba(0,0,0,.05); }
.api-entry h3.api-name { margin:.6rem 0 .3rem; font-size:1.15rem; } .api-entry h3.api-name code { background:none; }
.api-entry hr { display:none; }
details.code-fold summary { cursor:pointer; color:var(--muted); font-size:.85rem; }
.widget-note { border:1px dashed var(--border); padding:.4rem .7rem; color:var(--muted); margin:.3rem 0 .3rem .8rem; font-size:.9rem; }
span.math { font-family: "Times New Roman", serif; font-style:italic; } span.math.display { display:block; text-align:center; }
nav.pager { display:flex; justify-content:space-between; gap:1rem; margin-top:3rem; padding-top:1rem; border-top:1px solid var(--border); }
nav.pager a { display:block; border:1px solid var(--border); border-radius:6px; padding:.5rem .9rem; max-width:48%; }
nav.pager .lbl { display:block; font-size:.75rem; color:var(--muted); }
footer { color:var(--muted); font-size:.8rem; padding:1rem 2rem; border-top:1px solid var(--border); }
.callout-note, .callout-tip, .callout-warning, .callout-important, .callout-caution { border-left:4px solid var(--accent);
  background:#f3f7fc; padding:.2rem 1rem; margin:1rem 0; border-radius:4px; }
.callout-warning, .callout-caution { border-left-color:#e0a800; background:#fdf8e8; }
.callout-important { border-left-color:#d9534f; background:#fcf1f0; }
blockquote { border-left:3px solid var(--border); margin-left:0; padding-left:1rem; color:var(--muted); }
@media (max-width: 1100px) { aside.toc { display:none; } }
@media (max-width: 760px) { .layout { display:block; } nav.sidebar { position:static; width:auto; max-height:none; border-right:0; } }
"""

def nav_html(ctx: Ctx, cur: Page) -> str:
    res, section = ['<ul>'], None
    for pg in ctx.pages:
        if pg.section != section and pg.section:
            res.append(f'<li class="section">{html.escape(pg.section)}</li>')
        section = pg.section
        href = os.path.relpath(pg.html, cur.html.parent).replace(os.sep, '/')
        active = ' class="active" aria-current="page"' if pg is cur else ''
        res.append(f'<li><a href="{href}"{active}>{html.escape(pg.title)}</a></li>')
    res.append('</ul>')
    return ''.join(res)

def page_html(ctx: Ctx, cfg: dict, pg: Page, body: str, toc: list) -> str:
    root = os.path.relpath('.', pg.html.parent).replace(os.sep, '/') + '/'
    if root == './': root = ''
    i = ctx.pages.index(pg)
    def link(p, lbl, cls):
        href = os.path.relpath(p.html, pg.html.parent).replace(os.sep, '/')
        return f'<a class="{cls}" href="{href}"><span class="lbl">{lbl}</span>{html.escape(p.title)}</a>'
    prev = link(ctx.pages[i-1], '&larr; Previous', 'prev') if i > 0 else '<span></span>'
    nxt = link(ctx.pages[i+1], 'Next &rarr;', 'next') if i + 1 < len(ctx.pages) else '<span></span>'
    toc_html = ''
    if toc:
        items = ''.join(f'<li class="l{lvl}"><a href="#{a}">{html.escape(re.sub(r"[`*]", "", t))}</a></li>' for lvl, t, a in toc)
        toc_html = f'<aside class="toc" aria-label="On this page"><div class="toc-title">On this page</div><ul>{items}</ul></aside>'
    extra_css = ''.join(f'<link rel="stylesheet" href="{root}{c}">' for c in ctx.css)
    title = cfg['title'] if pg.nb == Path('index.ipynb') and pg.title == cfg['title'] else f'{pg.title} – {cfg["title"]}'
    desc = f'<div class="description">{html.escape(pg.description)}</div>' if pg.description else ''
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><meta name="description" content="{html.escape(pg.description or cfg['description'])}">
<link rel="stylesheet" href="{root}site.css">{extra_css}</head>
<body>
<header class="navbar"><a class="site-title" href="{root}index.html">{html.escape(cfg['title'])}</a><span class="site-desc">{html.escape(cfg['description'])}</span></header>
<div class="layout">
<nav class="sidebar" id="sidebar" aria-label="Site navigation">{nav_html(ctx, pg)}</nav>
<main class="content" id="content">
<h1 class="title">{html.escape(pg.title)}</h1>{desc}
{body}
<nav class="pager" aria-label="Previous and next page">{prev}{nxt}</nav>
</main>
{toc_html}
</div>
<footer>Built from <code>nbs/{html.escape(pg.nb.as_posix())}</code> by <code>tools/build_docs.py</code> (stored notebook outputs, no Quarto).</footer>
</body></html>
"""

# ---------------------------------------------------------------------------------------------------------------
# The site

def build(out: Path | str = ROOT/'_site', nbs: Path | str = ROOT/'nbs', quiet: bool = True) -> list[Page]:
    "Build the site from the notebooks in `nbs` into `out` (replaced atomically); returns its pages in nav order."
    t0 = time.time()
    nbs, out = Path(nbs).resolve(), Path(out).resolve()
    if not nbs.is_dir(): raise BuildError(f'notebook folder {nbs} does not exist')
    if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
    os.environ.setdefault('MPLBACKEND', 'Agg')
    cfg = site_config(nbs)
    pages = site_pages(nbs)
    tmp = Path(tempfile.mkdtemp(prefix='.' + out.name + '.', dir=out.parent if out.parent.exists() else None))
    ctx = Ctx(nbs=nbs, out=tmp, pages=pages)
    ctx.by_nb = {pg.nb: pg for pg in pages}
    ctx.css = [p.name for p in sorted(nbs.glob('*.css'))]
    cache = {}
    try:
        for pg in pages:
            try: cache[pg.nb] = nbformat.read(str(nbs/pg.nb), as_version=4)
            except Exception as e: raise BuildError(f'{nbs/pg.nb}: cannot read the notebook: {type(e).__name__}: {e}') from e
        # titles first (the navigation of every page needs all of them)
        for pg in pages:
            first = next((c for c in cache[pg.nb].cells if c.cell_type == 'markdown'), None)
            m = re.match(r'^\s*#\s+(.+?)\s*$', first.source.split('\n', 1)[0]) if first is not None else None
            pg.title = m.group(1) if m else pg.nb.stem
        collect_symbols(ctx, cache)
        bodies = {}
        for pg in pages:
            r = PageRenderer(ctx, pg, cache[pg.nb])
            try: body = r.render()
            except BuildError: raise
            except Exception as e:
                raise BuildError(f'{nbs/pg.nb}: cannot be rendered: {type(e).__name__}: {e}') from e
            bodies[pg.nb] = (body, r.toc)
        for pg in pages:
            body, toc = bodies[pg.nb]
            dst = tmp/pg.html
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(page_html(ctx, cfg, pg, body, toc), encoding='utf-8')
        (tmp/'site.css').write_text(CSS + HtmlFormatter().get_style_defs('pre code'), encoding='utf-8')
        for c in ctx.css: shutil.copy2(nbs/c, tmp/c)
        for a in ctx.assets:
            (tmp/a).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(nbs/a, tmp/a)
        (tmp/'.nojekyll').write_text('')
        (tmp/'pages.json').write_text(json.dumps([dict(notebook=p.nb.as_posix(), page=p.html.as_posix(),
                                                       title=p.title, section=p.section) for p in pages], indent=1))
        old = out.with_name('.' + out.name + '.old')
        if old.exists(): shutil.rmtree(old)
        if out.exists(): out.rename(old)
        tmp.chmod(0o755)
        tmp.rename(out)
        if old.exists(): shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        for w in ctx.warnings: print('warning:', w, file=sys.stderr)
        print(f'built {len(pages)} pages into {out} in {time.time()-t0:.1f}s')
    return pages

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=str(ROOT/'_site'), help='output folder (replaced)')
    p.add_argument('--nbs', default=str(ROOT/'nbs'), help='notebook folder')
    p.add_argument('-q', '--quiet', action='store_true')
    a = p.parse_args(argv)
    try: build(a.out, a.nbs, quiet=a.quiet)
    except BuildError as e:
        print(f'build_docs: error: {e}', file=sys.stderr)
        return 1
    return 0

if __name__ == '__main__': sys.exit(main())
