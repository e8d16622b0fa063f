// Must be the CLI's first import: libuv sizes its thread pool at first use, and the default of
// 4 threads would serialize a LUN's reads and writes behind a slow fdatasync.
if (!process.env.UV_THREADPOOL_SIZE) process.env.UV_THREADPOOL_SIZE = '32';
export {};
