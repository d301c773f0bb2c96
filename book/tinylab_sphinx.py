"""A Sphinx extension for the tinylab book: Jupyter Book 1 registers sphinx-thebe's configuration script twice,
and a page that declares `const THEBE_JS_URL` twice logs an error in every browser. Keep each script once."""


def keep_each_script_once(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for script in context.get("script_files", []):
        # a script without a file is registered with filename None or '' (the same script, twice)
        key = (getattr(script, "filename", script) or "", repr(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", keep_each_script_once)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
