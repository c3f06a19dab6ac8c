"""Makes the pickles in this folder with older pandas, pyarrow and datasets than CI has.

Every file holds the same rows, so one expected answer fits all. Run each line in a throwaway venv:
    python -m venv /tmp/pd15 && /tmp/pd15/bin/pip install pandas==1.5.3 numpy==1.26.4 pyarrow==14.0.2
    /tmp/pd15/bin/python make_pickles.py
    python -m venv /tmp/pd22 && /tmp/pd22/bin/pip install pandas==2.2.3 numpy==1.26.4 pyarrow==17.0.0 \
        datasets==2.21.0 polars
    /tmp/pd22/bin/python make_pickles.py
"""
import pickle

import numpy as np
import pandas as pd

TEXTS, LABELS = ["x one", "y two", "z \u00fc"], [1, 2, 3]  # what every file holds (polars' is refused)
news = {"id": [7, 8, 9], "title": ["t1", "t2", "t3"], "text": TEXTS, "label": LABELS, "url": ["u1", "u2", "u3"],
        "score": [0.5, np.nan, 1.0]}
tables = {
    # object columns not evenly spaced: their block's placement is an array, not a slice
    "news_object": pd.DataFrame({k: news[k] for k in ("id", "title", "text", "label", "url")}),
    "news_with_floats": pd.DataFrame(news),
    "category_label": pd.DataFrame({"text": TEXTS, "label": pd.Categorical(LABELS, categories=[3, 2, 1])}),
    "nullable_Int64_label": pd.DataFrame({"text": TEXTS, "label": pd.array(LABELS, dtype="Int64")}),
    # one 2-D object block flagged Fortran-ordered, whose items numpy still lists row by row
    "from_a_2d_object_array": pd.DataFrame(np.array([[t, y, "x"] for t, y in zip(TEXTS, LABELS)], dtype=object),
                                           columns=["text", "label", "other"]),
}
version = pd.__version__[:3]
if version == "1.5":
    tables["string_pyarrow"] = pd.DataFrame({"text": pd.array(TEXTS, dtype="string[pyarrow]"), "label": LABELS})
if version == "2.2":
    pd.set_option("future.infer_string", True)
    tables["infer_string"] = pd.DataFrame(news)
    pd.set_option("future.infer_string", False)
    import datasets
    import polars
    one = datasets.Dataset.from_dict({"text": TEXTS[:1], "label": LABELS[:1]})
    tables["datasets2.21_concatenated"] = datasets.concatenate_datasets(
        [one, datasets.Dataset.from_dict({"text": TEXTS[1:], "label": LABELS[1:]})])
    tables["polars"] = polars.DataFrame({"text": TEXTS, "label": LABELS})
for name, table in tables.items():
    with open(f"pandas{version}_{name}.pkl", "wb") as f:
        pickle.dump(table, f, protocol=4)
