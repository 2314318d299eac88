/* Fault injection at the write(2) boundary, loaded with LD_PRELOAD by tests/test_faults.py.
 *
 * While the file named by $FAULTFS_CONTROL holds "<ENOSPC|EIO> <substring>", every write(2)
 * to an open file whose path contains <substring> fails with that errno, as a full or failing
 * disk would make it fail. An absent or empty control file lets every write through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static ssize_t (*real_write)(int, const void *, size_t);

static int injected_errno(int fd) {
    const char *control = getenv("FAULTFS_CONTROL");
    if (control == NULL) return 0;
    int cfd = open(control, O_RDONLY | O_CLOEXEC);
    if (cfd < 0) return 0;
    char spec[512];
    ssize_t n = read(cfd, spec, sizeof spec - 1);
    close(cfd);
    if (n <= 0) return 0;
    spec[n] = '\0';
    char name[32], needle[400];
    if (sscanf(spec, "%31s %399s", name, needle) != 2) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t m = readlink(link, path, sizeof path - 1);
    if (m < 0) return 0;
    path[m] = '\0';
    if (strstr(path, needle) == NULL) return 0;
    if (strcmp(name, "ENOSPC") == 0) return ENOSPC;
    if (strcmp(name, "EIO") == 0) return EIO;
    return 0;
}

ssize_t write(int fd, const void *buf, size_t count) {
    if (real_write == NULL) real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    int error = injected_errno(fd);
    if (error != 0) {
        errno = error;
        return -1;
    }
    return real_write(fd, buf, count);
}
