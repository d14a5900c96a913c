"""Where kernels come from: the CUPTI module recorder, registered images, library scans."""
