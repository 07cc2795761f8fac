"""python -m pipelines.spec docs | check SPEC"""

import sys

from pipelines.spec import SpecError, load_spec
from pipelines.spec.docs import reference_markdown

if sys.argv[1:] == ["docs"]:
    sys.stdout.write(reference_markdown())
elif len(sys.argv) == 3 and sys.argv[1] == "check":
    try:
        s = load_spec(sys.argv[2])
    except SpecError as e:
        sys.exit(str(e))
    print(f"{s.name}: valid ({len(s.stages)} stages: {', '.join(st.name for st in s.stages)})")
else:
    sys.exit("usage: python -m pipelines.spec docs | check SPEC")
