/* cgsnap's one piece of C: the loop that adds a run of kernel nodes to a graph.
 *
 * From Python each cuGraphAddKernelNode is a ctypes foreign call of 0.8-1.0 us, two to three
 * times the driver call itself; this loop makes it one foreign call per run of nodes. It links
 * nothing: the caller passes the driver entry points (cuGraphAddKernelNode_v2 and
 * cuGraphKernelNodeSetAttribute), so the file compiles with any C compiler and no CUDA
 * headers. Built and cached on first use by cgsnap/native.py; without a compiler cgsnap runs
 * the same loop in Python.
 *
 * Node i of the run: its new handle is written to handle_ptrs[i], it depends on the ndeps[i]
 * handles at dep_ptrs[i] (0: none), its CUDA_KERNEL_NODE_PARAMS is at param_ptrs[i], and
 * attr_ptrs[i] (0: none) points at its launch attributes: a uint64 count, then per attribute a
 * uint64 CUlaunchAttributeID and its 64-byte CUlaunchAttributeValue. The first failing call
 * stops the loop: its result code is returned and the node's index stored in *failed. */
#include <stddef.h>
#include <stdint.h>

typedef int (*add_kernel_node_fn)(void *node_out, void *graph, const void *deps, size_t ndeps,
                                  const void *params);
typedef int (*set_attribute_fn)(void *node, int attr, const void *value);

enum { ATTR_VALUE_BYTES = 64 };

int cgsnap_add_kernel_nodes(add_kernel_node_fn add, set_attribute_fn set_attribute,
                            void *graph, size_t n, const uint64_t *handle_ptrs,
                            const uint64_t *dep_ptrs, const uint64_t *ndeps,
                            const uint64_t *param_ptrs, const uint64_t *attr_ptrs,
                            size_t *failed)
{
    for (size_t i = 0; i < n; i++) {
        void *out = (void *)(uintptr_t)handle_ptrs[i];
        int code = add(out, graph, (const void *)(uintptr_t)dep_ptrs[i], (size_t)ndeps[i],
                       (const void *)(uintptr_t)param_ptrs[i]);
        if (!code && attr_ptrs && attr_ptrs[i]) {
            const uint64_t *block = (const uint64_t *)(uintptr_t)attr_ptrs[i];
            const unsigned char *item = (const unsigned char *)(block + 1);
            void *node = *(void **)out;
            for (uint64_t a = 0; a < block[0] && !code; a++) {
                code = set_attribute(node, (int)*(const uint64_t *)item, item + 8);
                item += 8 + ATTR_VALUE_BYTES;
            }
        }
        if (code) {
            *failed = i;
            return code;
        }
    }
    return 0;
}
