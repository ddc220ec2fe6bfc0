/* LD_PRELOAD bind shim for Orthanc 1.10, which cannot be told which address its DICOM
 * listener binds to: every bind() to the IPv4 or IPv6 wildcard address is rewritten to the
 * loopback address (127.0.0.1 or ::1), so nothing it listens on is reachable from other
 * hosts. Build: gcc -shared -fPIC -O2 -o bindshim.so bindshim.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind = NULL;
    if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr != NULL && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in copy;
        memcpy(&copy, addr, sizeof copy);
        if (copy.sin_addr.s_addr == htonl(INADDR_ANY)) {
            copy.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            if (getenv("BINDSHIM_VERBOSE"))
                fprintf(stderr, "bindshim: 0.0.0.0:%d -> 127.0.0.1\n", ntohs(copy.sin_port));
            return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    } else if (addr != NULL && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 copy;
        memcpy(&copy, addr, sizeof copy);
        if (memcmp(&copy.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            copy.sin6_addr = in6addr_loopback;
            if (getenv("BINDSHIM_VERBOSE"))
                fprintf(stderr, "bindshim: [::]:%d -> [::1]\n", ntohs(copy.sin6_port));
            return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    }
    return real_bind(fd, addr, len);
}
