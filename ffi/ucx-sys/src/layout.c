/* Sizes, offsets and constant values of the UCX headers, for the bindings' layout test. */
#include <stddef.h>
#include <stdint.h>
#include <ucp/api/ucp.h>

#define OFF(t, f) (uint64_t)offsetof(t, f)

/* Every number the test compares, in one table: index -> value. */
static const uint64_t table[] = {
    sizeof(ucp_params_t),
    OFF(ucp_params_t, features),
    OFF(ucp_params_t, mt_workers_shared),
    OFF(ucp_params_t, name),
    sizeof(ucp_worker_params_t),
    OFF(ucp_worker_params_t, thread_mode),
    OFF(ucp_worker_params_t, events),
    OFF(ucp_worker_params_t, name),
    sizeof(ucp_ep_params_t),
    OFF(ucp_ep_params_t, address),
    OFF(ucp_ep_params_t, err_mode),
    OFF(ucp_ep_params_t, err_handler),
    OFF(ucp_ep_params_t, name),
    sizeof(ucp_mem_map_params_t),
    OFF(ucp_mem_map_params_t, address),
    OFF(ucp_mem_map_params_t, length),
    OFF(ucp_mem_map_params_t, flags),
    OFF(ucp_mem_map_params_t, memory_type),
    sizeof(ucp_request_param_t),
    OFF(ucp_request_param_t, flags),
    OFF(ucp_request_param_t, cb),
    OFF(ucp_request_param_t, datatype),
    OFF(ucp_request_param_t, memh),
    UCP_PARAM_FIELD_FEATURES,
    UCP_PARAM_FIELD_MT_WORKERS_SHARED,
    UCP_PARAM_FIELD_NAME,
    UCP_FEATURE_RMA,
    UCP_FEATURE_WAKEUP,
    UCP_WORKER_PARAM_FIELD_THREAD_MODE,
    UCP_WORKER_PARAM_FIELD_EVENTS,
    UCP_WORKER_PARAM_FIELD_NAME,
    UCP_WAKEUP_RMA,
    UCP_WAKEUP_TX,
    UCS_THREAD_MODE_SINGLE,
    UCP_EP_PARAM_FIELD_REMOTE_ADDRESS,
    UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
    UCP_EP_PARAM_FIELD_ERR_HANDLER,
    UCP_ERR_HANDLING_MODE_PEER,
    UCP_MEM_MAP_PARAM_FIELD_ADDRESS,
    UCP_MEM_MAP_PARAM_FIELD_LENGTH,
    UCP_OP_ATTR_FIELD_FLAGS,
    UCP_OP_ATTR_FIELD_MEMH,
    UCP_EP_CLOSE_FLAG_FORCE,
    UCP_API_MAJOR,
    UCP_API_MINOR,
    (uint64_t)(int64_t)UCS_ERR_LAST,
    (uint64_t)(int64_t)UCS_INPROGRESS,
    (uint64_t)(int64_t)UCS_ERR_BUSY,
    UCP_OP_ATTR_FIELD_CALLBACK,
    UCP_OP_ATTR_FIELD_USER_DATA,
    UCP_ERR_HANDLING_MODE_NONE,
    (uint64_t)(int64_t)UCS_ERR_UNREACHABLE,
};

uint64_t ucx_sys_layout(uint32_t i) { return i < sizeof(table) / sizeof(table[0]) ? table[i] : UINT64_MAX; }
