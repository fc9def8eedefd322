"""Publishing a batch run's output: the incremental index, the contact sheet and the HTML gallery.

Why a package of its own: these are what turn the batch operator into a nightly job that never pays
twice (the index) and that a person can check at a glance (the contact sheet and gallery). They are
reusable outside the example DAGs:

- :mod:`~airflow_provider_imagen.publish.index`: content keys, the index of what was already
  generated, and the plan of what is new (pandas + pyarrow, storage through ``ObjectStoragePath``);
- :mod:`~airflow_provider_imagen.publish.contact_sheet`: a PNG grid of thumbnails (Pillow only, no
  Airflow);
- :mod:`~airflow_provider_imagen.publish.gallery`: a static HTML page (standard library only);
- :mod:`~airflow_provider_imagen.publish.runs`: the plan and publish steps the example DAGs run around
  the batch operator, and where each file lives under an output root.

Nothing is imported here, so importing one module never pulls in the others' dependencies; all of
them come with the ``publish`` extra, which this checks first.
"""

from __future__ import annotations

from airflow_provider_imagen._extras import require_extra

require_extra("publish", feature="Publishing a run (airflow_provider_imagen.publish)")
