"""`defectfill demo`: the whole job on a drawn dataset, offline (`job`), and the drawn MVTec-layout demo
dataset itself (`dataset`, also `defectfill make-demo-data`)."""
