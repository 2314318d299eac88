/* Fault injection where bytes are written, loaded with LD_PRELOAD by the tests.
 *
 * While the file named by $FAULTFS_CONTROL holds "<ENOSPC|EIO> <substring>", every write(2),
 * and every copy_file_range(2) or sendfile(2) into an open file, whose path contains
 * <substring> fails with that errno, as a full or failing disk would make it fail.
 *
 * While it holds "EROFS <substring>", every call that would change a path containing
 * <substring> fails with EROFS, as on a file system mounted read-only: open(2) for writing
 * or creating, mkdir(2), rename(2), unlink(2) and rmdir(2) (and their *at forms, for
 * absolute paths). Reading stays possible. An absent or empty control file lets all through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The control file, read with raw system calls: open() itself is wrapped below. */
static int read_control(char *name, size_t name_size, char *needle, size_t needle_size) {
    const char *control = getenv("FAULTFS_CONTROL");
    if (control == NULL) return 0;
    int cfd = (int)syscall(SYS_openat, AT_FDCWD, control, O_RDONLY | O_CLOEXEC);
    if (cfd < 0) return 0;
    char spec[512];
    ssize_t n = (ssize_t)syscall(SYS_read, cfd, spec, sizeof spec - 1);
    syscall(SYS_close, cfd);
    if (n <= 0) return 0;
    spec[n] = '\0';
    char format[32];
    snprintf(format, sizeof format, "%%%zus %%%zus", name_size - 1, needle_size - 1);
    return sscanf(spec, format, name, needle) == 2;
}

/* EROFS if the control file says so and path (absolute, or relative to the working folder)
 * contains the substring; 0 otherwise. */
static int read_only_errno(const char *path) {
    char name[32], needle[400];
    if (path == NULL || !read_control(name, sizeof name, needle, sizeof needle)) return 0;
    if (strcmp(name, "EROFS") != 0) return 0;
    char full[4096];
    if (path[0] == '/') {
        snprintf(full, sizeof full, "%s", path);
    } else {
        char cwd[2048];
        if (getcwd(cwd, sizeof cwd) == NULL) return 0;
        snprintf(full, sizeof full, "%s/%s", cwd, path);
    }
    return strstr(full, needle) != NULL ? EROFS : 0;
}

#define WRITING (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND)

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_copy_file_range)(int, off_t *, int, off_t *, size_t, unsigned int);
static ssize_t (*real_sendfile)(int, int, off_t *, size_t);

static int injected_errno(int fd) {
    char name[32], needle[400];
    if (!read_control(name, sizeof name, needle, sizeof needle)) return 0;
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

/* --- a read-only file system ------------------------------------------------------------ */

#define FAIL_IF_READ_ONLY(path)            \
    do {                                   \
        int error_ = read_only_errno(path); \
        if (error_ != 0) {                 \
            errno = error_;                \
            return -1;                     \
        }                                  \
    } while (0)

static int open_with(const char *symbol, int at, int dirfd, const char *path, int flags,
                     mode_t mode) {
    if ((flags & WRITING) && (!at || dirfd == AT_FDCWD || path[0] == '/')) FAIL_IF_READ_ONLY(path);
    if (!at) {
        int (*real)(const char *, int, ...) =
            (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, symbol);
        return real(path, flags, mode);
    }
    int (*real_at)(int, const char *, int, ...) =
        (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, symbol);
    return real_at(dirfd, path, flags, mode);
}

static mode_t mode_of(int flags, va_list args) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(args, int) : 0;
}

int open(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return open_with("open", 0, AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return open_with("open64", 0, AT_FDCWD, path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return open_with("openat", 1, dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list args;
    va_start(args, flags);
    mode_t mode = mode_of(flags, args);
    va_end(args);
    return open_with("openat64", 1, dirfd, path, flags, mode);
}

int mkdir(const char *path, mode_t mode) {
    FAIL_IF_READ_ONLY(path);
    int (*real)(const char *, mode_t) = (int (*)(const char *, mode_t))dlsym(RTLD_NEXT, "mkdir");
    return real(path, mode);
}

int mkdirat(int dirfd, const char *path, mode_t mode) {
    if (dirfd == AT_FDCWD || path[0] == '/') FAIL_IF_READ_ONLY(path);
    int (*real)(int, const char *, mode_t) =
        (int (*)(int, const char *, mode_t))dlsym(RTLD_NEXT, "mkdirat");
    return real(dirfd, path, mode);
}

int rename(const char *old_path, const char *new_path) {
    FAIL_IF_READ_ONLY(old_path);
    FAIL_IF_READ_ONLY(new_path);
    int (*real)(const char *, const char *) =
        (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    return real(old_path, new_path);
}

int renameat(int old_dirfd, const char *old_path, int new_dirfd, const char *new_path) {
    if (old_dirfd == AT_FDCWD || old_path[0] == '/') FAIL_IF_READ_ONLY(old_path);
    if (new_dirfd == AT_FDCWD || new_path[0] == '/') FAIL_IF_READ_ONLY(new_path);
    int (*real)(int, const char *, int, const char *) =
        (int (*)(int, const char *, int, const char *))dlsym(RTLD_NEXT, "renameat");
    return real(old_dirfd, old_path, new_dirfd, new_path);
}

int unlink(const char *path) {
    FAIL_IF_READ_ONLY(path);
    int (*real)(const char *) = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    return real(path);
}

int unlinkat(int dirfd, const char *path, int flags) {
    if (dirfd == AT_FDCWD || path[0] == '/') FAIL_IF_READ_ONLY(path);
    int (*real)(int, const char *, int) = (int (*)(int, const char *, int))dlsym(RTLD_NEXT, "unlinkat");
    return real(dirfd, path, flags);
}

int rmdir(const char *path) {
    FAIL_IF_READ_ONLY(path);
    int (*real)(const char *) = (int (*)(const char *))dlsym(RTLD_NEXT, "rmdir");
    return real(path);
}
