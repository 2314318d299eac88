/* Fault injection where bytes are written, loaded with LD_PRELOAD by tests/test_faults.py.
 *
 * While the file named by $FAULTFS_CONTROL holds "<ENOSPC|EIO> <substring>", every write(2),
 * and every copy_file_range(2) or sendfile(2) into an open file, whose path contains
 * <substring> fails with that errno, as a full or failing disk would make it fail. An absent
 * or empty control file lets every write through.
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
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned int);
static ssize_t (*real_sendfile)(int, int, off_t *, size_t);

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

ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out, size_t len,
                        unsigned int flags) {
    if (real_copy_file_range == NULL)
        real_copy_file_range = (ssize_t (*)(int, off_t *, int, off_t *, size_t, unsigned int))
            dlsym(RTLD_NEXT, "copy_file_range");
    int error = injected_errno(fd_out);
    if (error != 0) {
        errno = error;
        return -1;
    }
    return real_copy_file_range(fd_in, off_in, fd_out, off_out, len, flags);
}

static ssize_t checked_sendfile(const char *symbol, int out_fd, int in_fd, off_t *offset,
                                size_t count) {
    if (real_sendfile == NULL)
        real_sendfile = (ssize_t (*)(int, int, off_t *, size_t))dlsym(RTLD_NEXT, symbol);
    int error = injected_errno(out_fd);
    if (error != 0) {
        errno = error;
        return -1;
    }
    return real_sendfile(out_fd, in_fd, offset, count);
}

/* Programs built with 64-bit file offsets (Python among them) call sendfile64. */
ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count) {
    return checked_sendfile("sendfile", out_fd, in_fd, offset, count);
}

ssize_t sendfile64(int out_fd, int in_fd, off_t *offset, size_t count) {
    return checked_sendfile("sendfile64", out_fd, in_fd, offset, count);
}
